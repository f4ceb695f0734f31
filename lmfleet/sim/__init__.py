"""An emulated LMDeploy `api_server` (lmdeploy 0.18.0) with a continuous-batching cost model.

Run one with `lmfleet sim --port P` or `python -m lmfleet.sim --port P`; build one
in-process with `create_app(SimOptions(...))`. See README.md beside this file.
"""

from lmfleet.sim.app import create_app
from lmfleet.sim.options import SimOptions

__all__ = ["SimOptions", "create_app"]
