"""`python -m wtfront.cli`: the `wt` command."""

import sys

from .commands import main

sys.exit(main())
