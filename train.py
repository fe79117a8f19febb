"""Train Crane / Crane+ prompts on an auxiliary dataset, as the published ``train.py`` (see
:mod:`crane.cli.train`, ``python train.py --help``)."""
import sys

from crane.cli.train import build_parser, main  # noqa: F401  (build_parser: for tools that read the flags)

if __name__ == "__main__":
    sys.exit(main())
