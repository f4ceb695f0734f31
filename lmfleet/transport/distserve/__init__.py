"""Prefill/decode disaggregation (LMDeploy's "DistServe"), shared by both front doors.

`DistServe` (control.py) is one fleet's serving mode; `PairLinks` (links.py) its
pair connections and the control calls that change them; `DistServePlan`
(exchange.py) is one request's prefill -> decode state machine, a
generator of I/O steps that `drive_sync` / `drive_async` (transport/steps.py)
perform for the sync transport, the async transport and so the proxy, exactly
as they perform a plain request's plan (transport/plan.py). `protocol.py` holds
LMDeploy 0.18.0's wire format. See docs/distserve.md.
"""

from lmfleet.transport.distserve.control import DistServe
from lmfleet.transport.distserve.exchange import DistServePlan
from lmfleet.transport.distserve.pairs import PairPool

__all__ = ["DistServe", "DistServePlan", "PairPool"]
