"""``python -m crane ...``: see :mod:`crane.cli`."""
import sys

try:  # Ctrl-C while the command line is imported: one line, not a traceback
    from crane.cli.dispatch import main
except KeyboardInterrupt:
    print("crane: interrupted while starting; nothing was written", file=sys.stderr)
    sys.exit(130)

sys.exit(main())
