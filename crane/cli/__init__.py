"""The command line, on top of everything else (nothing outside this package imports it).

One module per command (:mod:`~crane.cli.predict`, :mod:`~crane.cli.calibrate`,
:mod:`~crane.cli.export`, :mod:`~crane.cli.init_checkpoint`, :mod:`~crane.cli.test`,
:mod:`~crane.cli.train`), the shared flags (:mod:`~crane.cli.args`, made from
:mod:`crane.settings`), the model setup of one-process commands (:mod:`~crane.cli.setup`,
:mod:`~crane.cli.common`) and :func:`main`, the dispatcher of ``python -m crane``.
"""
from __future__ import annotations

from typing import Optional, Sequence


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m crane``: see :mod:`crane.cli.dispatch`."""
    from crane.cli.dispatch import main as run

    return run(argv)
