"""``python -m mixsga.train``: the ``mixsga-train`` command line (mixsga.train.cli)."""

import sys

from .cli import main

sys.exit(main())
