"""Train Crane / Crane+ prompts on an auxiliary dataset, as the published ``train.py`` (see
:mod:`crane.cli.train`, ``python train.py --help``)."""
import sys

try:  # Ctrl-C while torch and the models are imported: one line, not a traceback
    from crane.cli.train import build_parser, main  # noqa: F401  (build_parser: for tools that read the flags)
except KeyboardInterrupt:
    print("train.py: interrupted while starting; nothing was written", file=sys.stderr)
    sys.exit(130)

if __name__ == "__main__":
    sys.exit(main())
