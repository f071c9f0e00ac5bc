"""``python -m mergekitlite.cli ...``: the ``mergekitlite`` command."""

import sys

from mergekitlite.cli import main

sys.exit(main())
