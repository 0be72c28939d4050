"""`python -m training ...` is the `shapnets` command; torchrun launches it as `torchrun -m training train ...`."""

import sys

from .cli import main

sys.exit(main())
