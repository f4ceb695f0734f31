"""`python -m lmfleet.cli ...`: the `lmfleet` command without its console script."""

import sys

from lmfleet.cli import main

sys.exit(main())
