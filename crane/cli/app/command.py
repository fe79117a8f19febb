"""``python -m crane app``: serve the inspection page (also ``crane app``).

The model comes from a checkpoint (with the settings it records, as ``predict``) or from an
exported graph (``--model``, no torch). The page listens on 127.0.0.1 unless ``--host`` says
otherwise; it has no login. Uploads and results live in a temporary folder removed at exit,
and the page serves no file but those (Gradio's upload and cache folders are put inside it).
Exit status: 0 after Ctrl-C or SIGTERM, 2 unusable flags, model or thresholds (one line each, before any
model work where possible), 1 another error.
"""
from __future__ import annotations

import argparse
import os
import shutil
import signal
import sys
import tempfile
from pathlib import Path
from typing import Optional, Sequence

EXIT_ERROR, EXIT_USAGE = 1, 2
LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")


def build_parser() -> argparse.ArgumentParser:
    """The options of ``python -m crane app``: ``predict``'s model flags, ``--model`` for an exported graph,
    the thresholds, and the server's address and limits."""
    from .backend import add_model_flags

    parser = argparse.ArgumentParser(
        prog="python -m crane app", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Serve a page to inspect images (panels, scores, decisions at thresholds you move, the files "
                    "predict writes as a zip) and to calibrate thresholds on normal images, plus the HTTP API "
                    "endpoint /predict (one image -> score, decision, map shape). Needs the app extra: "
                    "pip install -e '.[app]'.",
        epilog="The model settings come from the checkpoint unless a flag sets them, as in predict. Thresholds: "
               "thresholds.json beside the checkpoint (or beside --model, which wins over those in its metadata), "
               "or --thresholds FILE; the Calibrate tab saves there.\nExit status: 0 stopped with Ctrl-C, 1 error, "
               "2 unusable input.")
    add_model_flags(parser)
    s = parser.add_argument_group("server")
    s.add_argument("--host", default="127.0.0.1",
                   help="address to listen on; 0.0.0.0 for every network interface (the page has no login) "
                        "(default: 127.0.0.1, this machine only)")
    s.add_argument("--port", type=int, default=7860, help="port (default: 7860)")
    s.add_argument("--max_file_size", type=float, default=200.0, metavar="MB",
                   help="largest file one upload may hold (default: 200)")
    s.add_argument("--max_zip_files", type=int, default=10_000, metavar="N",
                   help="most entries the zips of one upload may hold (default: 10000)")
    s.add_argument("--max_unpacked_size", type=float, default=2000.0, metavar="MB",
                   help="most bytes the zips of one upload may unpack to (default: 2000)")
    return parser


def _server_errors(args: argparse.Namespace) -> list[str]:
    errors = [] if 0 <= args.port <= 65535 else [f"--port must be in 0..65535, got {args.port}"]
    errors += [f"--{name} must be positive, got {getattr(args, name)}"
               for name in ("max_file_size", "max_zip_files", "max_unpacked_size") if not getattr(args, name) > 0]
    return errors


def _workdir() -> Path:
    """A new temporary folder for uploads and results; Gradio's upload and cache folders inside it (set
    before Gradio is imported: it reads them at import)."""
    workdir = Path(tempfile.mkdtemp(prefix="crane-app-"))
    os.environ["GRADIO_TEMP_DIR"] = str(workdir / "gradio")
    os.environ["GRADIO_EXAMPLES_CACHE"] = str(workdir / "gradio-examples")
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
    return workdir


def launch(demo, args: argparse.Namespace, block: bool = True):
    """Start the server of ``demo`` (queue: one model call at a time). ``block``: serve until Ctrl-C.
    Nothing outside the working folder is served: no ``allowed_paths``, and Gradio's own upload and cache
    folders are inside it (:func:`_workdir`)."""
    from .page import CSS, theme

    demo.queue(default_concurrency_limit=2, max_size=64)
    return demo.launch(server_name=args.host, server_port=args.port, max_file_size=int(args.max_file_size * 1024 ** 2),
                       share=False, inbrowser=False, show_error=True, ssr_mode=False, theme=theme(), css=CSS,
                       allowed_paths=[], prevent_thread_lock=not block)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``python -m crane app``; returns the exit status."""
    args = build_parser().parse_args(argv)
    from .backend import check_flags

    errors = check_flags(args) + _server_errors(args)
    if errors:
        for error in errors:
            print(f"error: {error}", file=sys.stderr)
        return EXIT_USAGE
    if args.host not in LOCAL_HOSTS:
        print(f"note: --host {args.host}: the page has no login; anyone who can reach {args.host}:{args.port} can "
              "use the model and its results", file=sys.stderr)
    workdir = _workdir()
    print(f"working folder (uploads, results; removed at exit): {workdir}", file=sys.stderr)
    terminate = signal.signal(signal.SIGTERM, signal.default_int_handler)  # as Ctrl-C: the server stops cleanly
    try:
        return _serve(args, workdir)
    finally:
        interrupt = signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C does not stop the removal
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        shutil.rmtree(workdir, ignore_errors=True)
        signal.signal(signal.SIGINT, interrupt)
        signal.signal(signal.SIGTERM, terminate)


def _serve(args: argparse.Namespace, workdir: Path) -> int:
    from .backend import Engine, one_line, user_errors
    from .uploads import ZipLimits

    try:
        import gradio  # noqa: F401
    except ImportError:
        print("error: the app needs Gradio: pip install -e '.[app]'", file=sys.stderr)
        return EXIT_USAGE
    try:
        engine = Engine.open(args)
    except KeyboardInterrupt:
        print("app: interrupted while loading the model", file=sys.stderr)
        return 130
    except Exception as e:
        if isinstance(e, user_errors()):
            print(f"error: {one_line(str(e))}", file=sys.stderr)
            return EXIT_USAGE
        if isinstance(e, (OSError, ValueError, RuntimeError)):
            print(f"error: {one_line(str(e) or type(e).__name__)}", file=sys.stderr)
            return EXIT_ERROR
        raise
    for note in engine.notes:
        print(note, file=sys.stderr)
    print(f"model: {engine.describe()}", file=sys.stderr)
    from .page import build_page

    limits = ZipLimits(args.max_zip_files, int(args.max_unpacked_size * 1024 ** 2))
    launch(build_page(engine, workdir, limits), args)  # serves until Ctrl-C
    return 0
