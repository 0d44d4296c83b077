"""`python -m hashmoe.compare ...`, the same as `hashmoe compare ...`."""
import sys

from hashmoe.compare.cli import main

sys.exit(main())
