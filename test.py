"""Evaluate a Crane / Crane+ checkpoint on one dataset: the published ``test.py`` flags (see
:mod:`crane.cli.test`, ``python test.py --help``)."""
import sys

try:  # Ctrl-C while torch and the models are imported: one line, not a traceback
    from crane.cli.test import build_parser, main  # noqa: F401  (build_parser: for tools that read the flags)
except KeyboardInterrupt:
    print("test.py: interrupted while starting; nothing was written", file=sys.stderr)
    sys.exit(130)

if __name__ == "__main__":
    sys.exit(main())
