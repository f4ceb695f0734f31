"""LeastLoad: local in-flight plus what the nodes report, without double counting."""

from __future__ import annotations

from lmfleet.routing import LeastLoad, NodeLoads, RequestInfo, parse_queue
from lmfleet.state import NodeState, NodeStatus


def node(name: str, inflight: int = 0) -> NodeState:
    return NodeState(url=f"http://{name}:1", status=NodeStatus.HEALTHY, inflight=inflight)


def test_without_reports_it_is_least_connections() -> None:
    nodes = [node("a", 3), node("b", 1), node("c", 2)]
    assert LeastLoad().pick(nodes, RequestInfo()) == nodes[1]


def test_reported_load_of_other_clients_counts() -> None:
    loads = NodeLoads()
    strategy = LeastLoad(loads)
    nodes = [node("a", 0), node("b", 0)]
    loads.report("http://a:1", queue=9, local_inflight=0)  # nine requests from elsewhere
    loads.report("http://b:1", queue=2, local_inflight=0)
    assert strategy.pick(nodes, RequestInfo()) == nodes[1]


def test_own_requests_are_not_counted_twice() -> None:
    loads = NodeLoads()
    loads.report("http://a:1", queue=4, local_inflight=4)  # the four were all ours
    assert loads.estimate(node("a", 4)) == 4
    assert loads.estimate(node("a", 6)) == 6  # two more sent since the report
    assert loads.estimate(node("a", 1)) == 1  # three of ours finished since


def test_estimate_never_below_local_inflight() -> None:
    loads = NodeLoads()
    loads.report("http://a:1", queue=0, local_inflight=5)  # report older than our sends
    assert loads.estimate(node("a", 2)) == 2


def test_ties_rotate() -> None:
    strategy = LeastLoad()
    nodes = [node("b"), node("a")]
    picks = [strategy.pick(nodes, RequestInfo()).url for _ in range(4)]  # type: ignore[union-attr]
    assert picks == ["http://a:1", "http://b:1", "http://a:1", "http://b:1"]


def test_forget_drops_a_report() -> None:
    loads = NodeLoads()
    loads.report("http://a:1", queue=7, local_inflight=0)
    loads.forget("http://a:1")
    assert loads.estimate(node("a", 1)) == 1


def test_parse_queue_reads_lmdeploy_gauges() -> None:
    text = (
        b"# TYPE lmdeploy:num_requests_running gauge\n"
        b'lmdeploy:num_requests_running{model_name="m"} 3\n'
        b"# TYPE lmdeploy:num_requests_waiting gauge\n"
        b'lmdeploy:num_requests_waiting{model_name="m"} 2.0\n'
    )
    assert parse_queue(text) == 5
    assert parse_queue(b"other_metric 1\n") is None
