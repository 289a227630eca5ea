"""``python -m astro_zackay``: the ``astro-zackay`` command."""

import sys

from .cli import main

sys.exit(main())
