"""`python -m pipeline ...` is the `spikedistill` command."""

import sys

from pipeline.cli import main

sys.exit(main())
