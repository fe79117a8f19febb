"""Evaluate a Crane / Crane+ checkpoint on one dataset (the original ``test.py`` flags, plus a few).

    python test.py --dataset visa --model_name trained_on_mvtec_crane --epoch 5 \\
        --features_list 6 12 18 24 --soft_mean True --dino_model none --devices 0

Writes ``metrics.json``, ``metrics.md``, ``predictions.csv`` (and with
``--save_maps`` the maps, with ``--visualize`` the panels) to ``--save_path``
(default ``results/MODEL_NAME/test_on_DATASET``). An interrupted run, started
again with the same flags, skips the classes it finished. Several GPUs:
``--devices 0 1 2 3`` or ``torchrun --nproc_per_node=4 test.py ...``.
"""
from __future__ import annotations

import argparse
import logging
import sys
from typing import Optional, Sequence

from crane.engine.evaluate import (AUPRO_METHODS, ATTN_TYPES, DINO_MODELS, IMAGE_TOKEN_TYPES, USER_ERRORS,
                                   EvalOptions, default_datasets_root, evaluate)


def str2bool(value: str) -> bool:
    """``True``/``False`` in the spellings the original scripts accepted (true, 1, yes, ...)."""
    lowered = str(value).strip().lower()
    if lowered in ("true", "t", "yes", "y", "1"):
        return True
    if lowered in ("false", "f", "no", "n", "0"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean (True/False), got {value!r}")


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``test.py``."""
    import torch

    p = argparse.ArgumentParser("test.py", description="Evaluate Crane / Crane+ zero-shot anomaly detection.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)

    def flag(group: argparse._ArgumentGroup, name: str, default: bool, help: str) -> None:
        group.add_argument(name, type=str2bool, nargs="?", const=True, default=default, metavar="True|False", help=help)

    d = EvalOptions()
    g = p.add_argument_group("data")
    g.add_argument("--dataset", default=d.dataset, help="dataset key: the folder DATASETS_ROOT_DIR/DATASET with meta.json")
    g.add_argument("--datasets_root_dir", default=default_datasets_root(),
                   help="folder holding one folder per dataset (default: $CRANE_DATASETS, else ./datasets/data)")
    g.add_argument("--k_shot", type=int, default=d.k_shot, help="keep K images per class (0: all)")
    g.add_argument("--portion", type=float, default=d.portion, help="keep this fraction of each class")
    g.add_argument("--seed", type=int, default=d.seed, help="seed of the k_shot / portion selection")
    g = p.add_argument_group("weights")
    g.add_argument("--model_name", default=d.model_name, help="checkpoints/MODEL_NAME/epoch_N.pth and results/MODEL_NAME/")
    g.add_argument("--epoch", type=int, default=d.epoch, help="checkpoint epoch")
    g.add_argument("--checkpoint", default=None, help="prompt-learner checkpoint file (overrides --model_name/--epoch)")
    g.add_argument("--clip_weights", default=d.clip_weights,
                   help="'openai' (cached download), a ViT-L-14-336px.pt file, or 'synthetic' (random, pipeline demo)")
    g.add_argument("--dino_weights", default=None, help="VFM weights file for --dino_model (default: hub/HF cache)")
    g = p.add_argument_group("model")
    g.add_argument("--features_list", type=int, nargs="+", default=list(d.features_list), help="vision layers")
    g.add_argument("--dino_model", choices=DINO_MODELS, default=d.dino_model, help="VFM of D-Attn (Crane+: dinov2)")
    flag(g, "--soft_mean", d.soft_mean, "average softmaxed maps over layers (else softmax of averaged logits)")
    g.add_argument("--image_size", type=int, default=d.image_size, help="input side S (maps are S x S)")
    g.add_argument("--sigma", type=float, default=d.sigma, help="Gaussian smoothing of the maps")
    g.add_argument("--attn_type", choices=ATTN_TYPES, default=d.attn_type, help="E-Attn self-correlation")
    flag(g, "--both_eattn_dattn", d.both_eattn_dattn, "layer 24 gives both D-Attn and E-Attn tokens")
    flag(g, "--use_scorebase_pooling", d.use_scorebase_pooling, "score-based pooling for the image score")
    flag(g, "--dattn_batch_mean", d.dattn_batch_mean, "published D-Attn mean over the whole batch (quirk 3)")
    g.add_argument("--train_with_img_cls_prob", type=float, default=d.train_with_img_cls_prob,
                   help="1: condition the prompts on each image at test (0: published evaluation)")
    g.add_argument("--train_with_img_cls_type", choices=IMAGE_TOKEN_TYPES, default=d.train_with_img_cls_type,
                   help="where the image token goes when conditioning")
    g.add_argument("--n_ctx", type=int, default=d.n_ctx, help="learnable context length")
    g.add_argument("--depth", type=int, default=d.depth, help="deep text prompt depth")
    g.add_argument("--t_n_ctx", type=int, default=d.t_n_ctx, help="deep text prompt length")
    g = p.add_argument_group("run")
    g.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu",
                   help="where to compute")
    g.add_argument("--devices", type=int, nargs="+", default=list(d.devices),
                   help="GPU indices; more than one spawns one process per index (with --device cpu: that many CPU processes)")
    g.add_argument("--batch_size", type=int, default=d.batch_size, help="images per forward pass and process")
    g.add_argument("--num_workers", type=int, default=None, help="data-loading workers per process (default: auto)")
    g.add_argument("--aupro_method", choices=AUPRO_METHODS, default=d.aupro_method,
                   help="crane: published 200-threshold AUPRO; mvtec: MVTec AD official")
    g = p.add_argument_group("output")
    g.add_argument("--save_path", default=None, help="results folder (default: results/MODEL_NAME/test_on_DATASET)")
    flag(g, "--save_maps", d.save_maps, "save each smoothed map as maps/<img_path>.npy (float32)")
    flag(g, "--visualize", d.visualize, "save a panel per image to visualization/CLASS/")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Parse ``argv`` and run the evaluation; return the exit code (2 for unusable input)."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        evaluate(EvalOptions(**vars(args)))
    except USER_ERRORS as e:
        print(f"test.py: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
