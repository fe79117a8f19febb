"""Evaluate a Crane / Crane+ checkpoint on one dataset: the published ``test.py`` flags (see
:mod:`crane.cli.test`, ``python test.py --help``)."""
import sys

from crane.cli.test import build_parser, main  # noqa: F401  (build_parser: for tools that read the flags)

if __name__ == "__main__":
    sys.exit(main())
