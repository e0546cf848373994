"""``python -m prunekit``: the same as the ``prunekit`` command."""

import sys

from .cli import main

sys.exit(main())
