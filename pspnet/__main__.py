"""`python -m pspnet ...`: the same as the `pspnet` console script."""

import sys

from pspnet.cli import main

sys.exit(main())
