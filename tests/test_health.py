from __future__ import annotations

import pytest

from lmfleet.health import Probe, judge
from lmfleet.state import NodeState, NodeStatus

HEALTHY = Probe("healthy", "")
SLEEPING = Probe("sleeping", "")
DOWN = Probe("unreachable", "refused")
INIT = Probe("initializing", "")


@pytest.mark.parametrize(
    ("status", "failures", "launched", "probe", "expected"),
    [
        (NodeStatus.STARTING, 0, False, HEALTHY, NodeStatus.HEALTHY),
        (NodeStatus.STARTING, 0, False, DOWN, NodeStatus.STARTING),
        (NodeStatus.STARTING, 1, False, DOWN, NodeStatus.UNHEALTHY),
        (NodeStatus.STARTING, 5, True, DOWN, NodeStatus.STARTING),
        (NodeStatus.STARTING, 5, False, INIT, NodeStatus.STARTING),
        (NodeStatus.HEALTHY, 0, False, DOWN, NodeStatus.HEALTHY),
        (NodeStatus.HEALTHY, 1, False, DOWN, NodeStatus.UNHEALTHY),
        (NodeStatus.HEALTHY, 0, False, SLEEPING, NodeStatus.SLEEPING),
        (NodeStatus.SLEEPING, 0, False, HEALTHY, NodeStatus.HEALTHY),
        (NodeStatus.UNHEALTHY, 0, False, HEALTHY, NodeStatus.HEALTHY),
        (NodeStatus.UNHEALTHY, 0, False, DOWN, NodeStatus.UNHEALTHY),
        (NodeStatus.DRAINING, 0, False, HEALTHY, NodeStatus.DRAINING),
        (NodeStatus.STOPPED, 0, False, HEALTHY, NodeStatus.STOPPED),
    ],
)
def test_judge(
    status: NodeStatus, failures: int, launched: bool, probe: Probe, expected: NodeStatus
) -> None:
    state = NodeState(url="http://a:1", status=status, failures=failures, launched=launched)
    assert judge(state, probe, unhealthy_after=2) is expected
