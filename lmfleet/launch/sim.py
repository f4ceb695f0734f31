"""The emulated node's default model, for `LMFleet.simulate`.

Its command line is `command.SIM_COMMAND`, the same process path a GPU node takes.
`lmfleet.sim.options.DEFAULT_MODEL` is the same name; it is not imported from there
because `lmfleet.sim` needs the `serve` extra and a fleet of emulated nodes runs them
as child processes, without importing it.
"""

from __future__ import annotations

DEFAULT_SIM_MODEL = "internlm/internlm2_5-7b-chat"
