"""`python -m sdjax` is the `sdjax` command."""

import sys

from sdjax.cli import main

sys.exit(main())
