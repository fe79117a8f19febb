"""``python -m crane ...``: see :mod:`crane.cli`."""
import sys

from crane.cli import main

sys.exit(main())
