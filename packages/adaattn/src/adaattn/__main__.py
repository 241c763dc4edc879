"""``python -m adaattn``: the ``adaattn`` command line."""

import sys

from adaattn.cli import main

sys.exit(main())
