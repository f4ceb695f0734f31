"""`python -m lmfleet.sim --port P --model NAME ...` (same arguments as `lmfleet sim`)."""

from __future__ import annotations

import argparse
import sys

from lmfleet.sim import cli


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m lmfleet.sim", description=cli.__doc__)
    cli.add_arguments(parser)
    return cli.run(parser.parse_args())


if __name__ == "__main__":
    sys.exit(main())
