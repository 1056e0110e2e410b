"""`python -m samjax.cli ...`, the same as the `samjax` command."""

import sys

from samjax.cli import main

sys.exit(main())
