"""``python -m connectors.dashboard``: see :mod:`connectors.dashboard.server`."""

import sys

from connectors.dashboard.server import main

if __name__ == "__main__":
    sys.exit(main())
