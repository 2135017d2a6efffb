"""``python -m tools.fuzz``: see ``cli.py``."""

import sys

from .cli import main

sys.exit(main())
