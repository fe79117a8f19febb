"""Train Crane / Crane+ prompts on an auxiliary dataset (the original ``train.py`` flags, plus a few).

    python train.py --dataset mvtec --model_name crane --features_list 6 12 18 24 --dino_model none
    python train.py --dataset visa --model_name cranep --features_list 24 --dino_model dinov2

Writes ``SAVE_PATH/trained_on_{datasets}_{MODEL_NAME}/epoch_{k}.pth`` (official
format, loadable by ``test.py --model_name trained_on_..._{MODEL_NAME}``), plus
``args.json``, ``log.csv``, ``train.log`` and ``last.pt`` (for ``--resume``).
Each image is encoded once and every epoch runs from those features. Several
GPUs: ``--devices 0 1 2 3`` or ``torchrun --nproc_per_node=4 train.py ...``
(``--batch_size`` is per process).
"""
from __future__ import annotations

import argparse
import logging
import sys
from typing import Optional, Sequence

from crane.cli_args import MAP_FLAGS, add_data_flags, add_model_flags, add_weight_flags
from crane.engine.train import FEATURE_CACHES, INTERPOLATIONS, USER_ERRORS, TrainOptions, train


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``train.py``."""
    import torch

    p = argparse.ArgumentParser("train.py", description="Train the Crane / Crane+ prompt learner.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)

    d = TrainOptions()
    g = p.add_argument_group("data")
    g.add_argument("--dataset", nargs="+", default=list(d.dataset),
                   help="auxiliary dataset key(s): folders DATASETS_ROOT_DIR/DATASET with meta.json (test split)")
    add_data_flags(g, d)
    g.add_argument("--aug_rate", type=float, default=d.aug_rate,
                   help="probability of replacing a sample by a 2x2 mosaic of its class (labelled anomalous)")
    g = p.add_argument_group("weights")
    add_weight_flags(g, d.clip_weights)
    g.add_argument("--init_checkpoint", default=None,
                   help="start from this prompt-learner checkpoint (official format) instead of a random init")
    g = p.add_argument_group("model")
    add_model_flags(g, d, skip=MAP_FLAGS)
    g.add_argument("--interpolation", choices=INTERPOLATIONS, default=d.interpolation,
                   help="upsampling of the training maps")
    g = p.add_argument_group("optimisation")
    g.add_argument("--epoch", type=int, default=d.epoch, help="epochs")
    g.add_argument("--learning_rate", type=float, default=d.learning_rate, help="Adam learning rate")
    g.add_argument("--batch_size", type=int, default=d.batch_size, help="images per step and process")
    g.add_argument("--seed", type=int, default=d.seed, help="seed of the prompt init, shuffling and k_shot/portion")
    g = p.add_argument_group("run")
    g.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu",
                   help="where to compute")
    g.add_argument("--devices", type=int, nargs="+", default=list(d.devices),
                   help="GPU indices; more than one spawns one process per index (with --device cpu: that many CPU processes)")
    g.add_argument("--feature_cache", choices=FEATURE_CACHES, default=d.feature_cache,
                   help="keep the frozen image features in memory, on disk under the run folder, or recompute "
                        "them every epoch (off: the published cost)")
    g.add_argument("--num_workers", type=int, default=None, help="data-loading workers per process (default: auto)")
    g = p.add_argument_group("output")
    g.add_argument("--model_name", default=d.model_name, help="run name: SAVE_PATH/trained_on_{datasets}_{MODEL_NAME}")
    g.add_argument("--save_path", default=d.save_path, help="folder of the run folders")
    g.add_argument("--save_freq", type=int, default=d.save_freq, help="write epoch_{k}.pth every this many epochs")
    g.add_argument("--resume", action="store_true", help="continue from the last complete epoch (last.pt)")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Parse ``argv`` and train; return the exit code (2 for unusable input)."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        train(TrainOptions(**vars(args)))
    except USER_ERRORS as e:
        print(f"train.py: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
