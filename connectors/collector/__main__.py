"""``python -m connectors.collector``: the same as ``clickpulse collector``."""

import sys

from connectors.collector.main import main

if __name__ == "__main__":
    sys.exit(main())
