"""``python -m oneforcing ...``: see :mod:`oneforcing.cli`."""

import sys

from .cli import main

sys.exit(main())
