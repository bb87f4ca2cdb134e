"""``python -m vmbackup_lab ...``: the lab's command line on its own."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
