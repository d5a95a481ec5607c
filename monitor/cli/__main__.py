"""``python -m monitor.cli``: the ``repwatch`` command line."""

import sys

from monitor.cli import main

sys.exit(main())
