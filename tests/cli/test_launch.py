"""`lmfleet launch`'s own flags (the proxy flags are `lmfleet serve`'s: test_serve_flags.py)."""

from __future__ import annotations

from cli_support import help_gaps, subcommand_parser

from lmfleet.launch.options import LaunchOptions


def test_every_flag_has_help_that_states_its_default() -> None:
    parser = subcommand_parser("launch")
    assert help_gaps(parser) == []
    args = parser.parse_args(["some/model"])
    defaults = LaunchOptions()
    taken = (args.launcher, args.restart, args.max_restarts, args.placement, args.base_port)
    assert taken == (
        defaults.launcher,
        defaults.restart,
        defaults.max_restarts,
        defaults.placement,
        defaults.base_port,
    )
