"""``python -m crane init-checkpoint OUT``: a randomly initialised prompt-learner checkpoint (for pipeline
demos only: predictions made with it are meaningless)."""
from __future__ import annotations

import argparse
from pathlib import Path

from crane import settings
from crane.checkpoints import METADATA_KEY, metadata_entry, replace_problem
from crane.cli.args import add_bool_flag
from crane.errors import CraneError
from crane.files import output_problem
from crane.models.weights import weights_problems


def add_parser(sub: argparse._SubParsersAction) -> None:
    """The ``init-checkpoint`` subcommand."""
    i = sub.add_parser("init-checkpoint", help="write a randomly initialised prompt-learner checkpoint (demos)",
                       description="Write an untrained prompt-learner checkpoint. Its predictions are meaningless: "
                                   "it exists so the pipeline can run without the official checkpoints.")
    i.add_argument("out", type=Path, metavar="OUT", help="checkpoint file to write")
    i.add_argument("--clip_weights", default="synthetic", metavar="W",
                   help="CLIP whose token embedding builds the prompt buffers (default: synthetic)")
    i.add_argument("--clip_model", default=settings.DEFAULT_CLIP_MODEL, metavar="NAME",
                   help=settings.BY_NAME["clip_model"].help + f" (default: {settings.DEFAULT_CLIP_MODEL})")
    i.add_argument("--seed", type=int, default=0, help="(default: 0)")
    add_bool_flag(i, "--overwrite", False, "replace an existing file (never a shipped official checkpoint)", True)


def run(args: argparse.Namespace) -> int:
    """``python -m crane init-checkpoint``."""
    import torch

    from crane.models.build import tokenizer
    from crane.models.clip_loader import load_clip
    from crane.models.prompts import PromptLearner, save_prompt_checkpoint

    problems = [p for p in (output_problem(args.out, flag="OUT"), replace_problem(args.out, args.overwrite, "OUT"))
                if p] + weights_problems(args.clip_weights, "none", None, args.clip_model)
    if problems:
        raise CraneError("; ".join(problems))
    weights = args.clip_weights
    if weights == "synthetic":
        from crane.models.synthetic import synthetic_clip_state_dict

        weights = synthetic_clip_state_dict(model=args.clip_model)
    clip = load_clip(weights, model=args.clip_model)
    torch.manual_seed(args.seed)
    learner = PromptLearner(clip.token_embedding, tokenizer(args.clip_model))
    extra = {} if args.clip_model == settings.DEFAULT_CLIP_MODEL else {METADATA_KEY: metadata_entry({"clip_model": args.clip_model})}
    save_prompt_checkpoint(learner, args.out, extra)
    print(f"wrote {args.out} (random prompts: predictions made with it are meaningless)")
    return 0


