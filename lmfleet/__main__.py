"""`python -m lmfleet ...`: the `lmfleet` command where its console script is not on
PATH (a notebook's `!python -m lmfleet serve`, a venv not activated)."""

import sys

from lmfleet.cli import main

sys.exit(main())
