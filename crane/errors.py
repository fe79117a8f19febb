"""The one base of every user-facing error.

A :class:`CraneError` is caused by the input (a flag, a file, a dataset, weights that
are not on this machine), not by a bug: every entry point reports it as one line on
stderr with exit status 2, before any model work where it can be found that early.
Each layer derives its own errors from it (``CheckpointError``, ``DatasetError``,
``WeightsNotFoundError``, ...), so an entry point catches this one type.

Torch-free (the deploy runtime uses it too).
"""
from __future__ import annotations

import sys
from typing import Callable

EXIT_USAGE = 2
"""Exit status of a :class:`CraneError`."""
EXIT_INTERRUPTED = 130
"""Exit status after Ctrl-C (128 + SIGINT)."""


class CraneError(ValueError):
    """An unusable input, reported as one line (exit status 2)."""


def one_line(message: object) -> str:
    """A message (such as a weights hint with bullets) as one line."""
    lines = [line.strip().lstrip("*").strip() for line in str(message).strip().splitlines()]
    return " ".join(line for line in lines if line) or "error"


def guarded(prog: str, work: Callable[[], int], interrupted: str) -> int:
    """Run an entry point's ``work`` and return its exit status; a :class:`CraneError` becomes one line
    ``PROG: error: ...`` on stderr and :data:`EXIT_USAGE`, Ctrl-C the line ``PROG: INTERRUPTED`` and
    :data:`EXIT_INTERRUPTED`."""
    try:
        return work()
    except CraneError as e:
        print(f"{prog}: error: {one_line(e)}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"{prog}: {interrupted}", file=sys.stderr)
        return EXIT_INTERRUPTED
