"""`python -m mpinn` is the same program as `mpinn`."""

import sys

from mpinn.cli.main import main

sys.exit(main())
