"""``python -m channels_lite``: the same as the ``channels-lite`` command."""

import sys

from .cli import main

sys.exit(main())
