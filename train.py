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

from crane.engine.train import (ATTN_TYPES, DINO_MODELS, FEATURE_CACHES, IMAGE_TOKEN_TYPES, INTERPOLATIONS,
                                USER_ERRORS, TrainOptions, default_datasets_root, train)


def str2bool(value: str) -> bool:
    """``True``/``False`` in the spellings the original scripts accepted (true, 1, yes, ...)."""
    lowered = str(value).strip().lower()
    if lowered in ("true", "t", "yes", "y", "1"):
        return True
    if lowered in ("false", "f", "no", "n", "0"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean (True/False), got {value!r}")


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``train.py``."""
    import torch

    p = argparse.ArgumentParser("train.py", description="Train the Crane / Crane+ prompt learner.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)

    def flag(group: argparse._ArgumentGroup, name: str, default: bool, help: str) -> None:
        group.add_argument(name, type=str2bool, nargs="?", const=True, default=default, metavar="True|False", help=help)

    d = TrainOptions()
    g = p.add_argument_group("data")
    g.add_argument("--dataset", nargs="+", default=list(d.dataset),
                   help="auxiliary dataset key(s): folders DATASETS_ROOT_DIR/DATASET with meta.json (test split)")
    g.add_argument("--datasets_root_dir", default=default_datasets_root(),
                   help="folder holding one folder per dataset (default: $CRANE_DATASETS, else ./datasets/data)")
    g.add_argument("--k_shot", type=int, default=d.k_shot, help="keep K images per class (0: all)")
    g.add_argument("--portion", type=float, default=d.portion, help="keep this fraction of each class")
    g.add_argument("--aug_rate", type=float, default=d.aug_rate,
                   help="probability of replacing a sample by a 2x2 mosaic of its class (labelled anomalous)")
    g = p.add_argument_group("weights")
    g.add_argument("--clip_weights", default=d.clip_weights,
                   help="'openai' (cached download), a ViT-L-14-336px.pt file, or 'synthetic' (random, pipeline demo)")
    g.add_argument("--dino_weights", default=None, help="VFM weights file for --dino_model (default: hub/HF cache)")
    g.add_argument("--init_checkpoint", default=None,
                   help="start from this prompt-learner checkpoint (official format) instead of a random init")
    g = p.add_argument_group("model")
    g.add_argument("--features_list", type=int, nargs="+", default=list(d.features_list), help="vision layers")
    g.add_argument("--dino_model", choices=DINO_MODELS, default=d.dino_model, help="VFM of D-Attn (Crane+: dinov2)")
    g.add_argument("--image_size", type=int, default=d.image_size, help="input side S")
    g.add_argument("--attn_type", choices=ATTN_TYPES, default=d.attn_type, help="E-Attn self-correlation")
    flag(g, "--both_eattn_dattn", d.both_eattn_dattn, "layer 24 gives both D-Attn and E-Attn tokens")
    flag(g, "--use_scorebase_pooling", d.use_scorebase_pooling, "score-based pooling for the image logits")
    flag(g, "--dattn_batch_mean", d.dattn_batch_mean, "published D-Attn mean over the whole batch (quirk 3)")
    g.add_argument("--train_with_img_cls_prob", type=float, default=d.train_with_img_cls_prob,
                   help="probability per step of image-conditioned prompts")
    g.add_argument("--train_with_img_cls_type", choices=IMAGE_TOKEN_TYPES, default=d.train_with_img_cls_type,
                   help="where the image token goes when conditioning")
    g.add_argument("--interpolation", choices=INTERPOLATIONS, default=d.interpolation,
                   help="upsampling of the training maps")
    g.add_argument("--n_ctx", type=int, default=d.n_ctx, help="learnable context length")
    g.add_argument("--depth", type=int, default=d.depth, help="deep text prompt depth")
    g.add_argument("--t_n_ctx", type=int, default=d.t_n_ctx, help="deep text prompt length")
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
