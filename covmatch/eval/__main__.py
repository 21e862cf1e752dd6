"""``python -m covmatch.eval`` is ``covmatch-eval``."""

import sys

from .cli import main

sys.exit(main())
