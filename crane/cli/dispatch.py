"""``python -m crane COMMAND`` (also installed as ``crane``): the dispatcher.

* ``predict INPUT... --checkpoint FILE --out DIR``: :mod:`crane.cli.predict`;
* ``calibrate --checkpoint FILE (--normal DIR... --target_fpr RATE | --labelled DIR... | --dataset NAME)``:
  :mod:`crane.cli.calibrate`;
* ``export --checkpoint FILE --out PATH``: :mod:`crane.cli.export`;
* ``init-checkpoint OUT``: :mod:`crane.cli.init_checkpoint`;
* ``app``: the inspection page and its HTTP API (:mod:`crane.cli.app`, the optional extra ``app``),
  with its own options.

The model settings come from the checkpoint unless a flag sets them (:mod:`crane.cli.setup`).
Exit status: 0 success, 1 an error (one line on stderr), 2 unusable input (one line per
problem, before any model work), 3 ``predict``/``calibrate`` skipped unreadable files (the
others were processed), 130 interrupted.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

from crane import __version__
from crane.cli import calibrate, export, init_checkpoint, predict
from crane.cli.common import EXIT_ERROR, EXIT_SKIPPED, checkpoint_of, settle  # noqa: F401  (the exit statuses)
from crane.cli.setup import flag_errors, input_problems
from crane.data.meta import default_datasets_root
from crane.errors import EXIT_INTERRUPTED, EXIT_USAGE, CraneError, one_line
from crane.logs import setup_logging

COMMANDS = {"predict": predict, "calibrate": calibrate, "export": export, "init-checkpoint": init_checkpoint}


def build_parser() -> argparse.ArgumentParser:
    """The parser of ``python -m crane`` with one subparser per command module."""
    parser = argparse.ArgumentParser(prog="python -m crane", description="Crane zero-shot anomaly detection.",
                                     epilog="Exit status: 0 ok, 1 error, 2 unusable input, 3 unreadable images "
                                            "skipped, 130 interrupted.")
    parser.add_argument("--version", action="version", version=f"crane {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in COMMANDS.values():
        module.add_parser(sub)
    sub.add_parser("app", add_help=False, help="inspect and calibrate in the browser (the extra 'app'; options: "
                                               "python -m crane app --help)")
    return parser


def _run(args: argparse.Namespace) -> int:
    if args.command not in ("predict", "calibrate"):
        return COMMANDS[args.command].run(args)
    exported = getattr(args, "backend", "torch") != "torch"  # an exported graph carries its checkpoint and settings
    if not exported:
        checkpoint_of(args)
    if args.command == "calibrate" and args.datasets_root_dir is None:
        args.datasets_root_dir = Path(default_datasets_root())
    errors = flag_errors(args) + input_problems(args)
    if not exported and getattr(args, "model", None):
        errors.append("--model is for --backend onnxruntime|openvino; the torch backend builds the model from "
                      "--checkpoint")
    if not exported:
        try:  # the checkpoint, the model settings and the weights: reported together with the flags' problems
            state, info = settle(args)
        except CraneError as e:
            errors += [line for line in str(e).splitlines() if line not in errors]
    if errors:
        for error in errors:
            print(f"error: {one_line(error)}", file=sys.stderr)
        return EXIT_USAGE
    if exported:
        return predict.run(args, None, None)
    return COMMANDS[args.command].run(args, state, info)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``python -m crane`` / ``crane``; returns the exit status."""
    setup_logging()
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["app"]:  # its own parser, imported only when asked for (Gradio is an optional extra)
        from crane.cli.app.command import main as app_main

        return app_main(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        return _run(args)
    except KeyboardInterrupt:
        print(f"{args.command}: interrupted before any result was written; run the same command again",
              file=sys.stderr)
        return EXIT_INTERRUPTED
    except CraneError as e:
        print(f"error: {one_line(e)}", file=sys.stderr)
        return EXIT_USAGE
    except (OSError, ValueError, RuntimeError) as e:
        print(f"error: {one_line(str(e) or type(e).__name__)}", file=sys.stderr)
        return EXIT_ERROR
