"""`python -m mpinn` is the same program as `mpinn`."""

import sys

from .cli import main

sys.exit(main())
