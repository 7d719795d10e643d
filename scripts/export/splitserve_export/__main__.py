"""`python -m splitserve_export`: the same command as `splitserve-export`."""

import sys

from splitserve_export.cli import main

sys.exit(main())
