"""``python -m covmatch.distill`` is ``covmatch-distill``."""

import sys

from .cli import main

sys.exit(main())
