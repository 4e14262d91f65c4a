"""`python -m hfqat.cli ...` (what `accelerate launch -m hfqat.cli` runs): the `hfqat` command."""

import sys

from .main import main

if __name__ == "__main__":
    sys.exit(main())
