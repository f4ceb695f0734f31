"""`lmfleet sim`'s flags: each one documented, and their defaults `SimOptions`' own."""

from __future__ import annotations

import pytest
from cli_support import help_gaps, subcommand_parser

from lmfleet.sim.cli import options_from_args
from lmfleet.sim.options import SimOptions


def test_every_flag_has_help_that_states_its_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LMDEPLOY_HEALTH_POLL_INTERVAL", raising=False)
    parser = subcommand_parser("sim")
    assert help_gaps(parser) == []
    # No flag given: exactly the model's defaults (the help reads the same ones).
    assert options_from_args(parser.parse_args([])) == SimOptions()
