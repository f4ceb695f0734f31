"""RL weight updates across a fleet: versions, phases, and LMDeploy's serializer.

`fleet.weight_update(version)` (update.py) and `fleet.update_weights(...)`
(rolling.py) run one update's phases (session.py) on LMDeploy's endpoints
(calls.py), after a preflight (preflight.py); bodies.py reads the payload forms.
`serialize` is the helper a trainer on the same host calls to make a body.
"""

from lmfleet.weights.serialize import serialize

__all__ = ["serialize"]
