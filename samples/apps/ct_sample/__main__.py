"""Run the application as ``python samples/apps/ct_sample`` (the layout the MAP packager expects)."""

import sys

from app import main

if __name__ == "__main__":
    sys.exit(main())
