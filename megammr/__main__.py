"""`python -m megammr ...` is the `megammr` command."""
import sys

from megammr.cli import main

if __name__ == "__main__":
    sys.exit(main())
