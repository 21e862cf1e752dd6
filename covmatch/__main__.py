"""``python -m covmatch`` is the ``covmatch`` command."""

import sys

from .cli import main

sys.exit(main())
