"""Option values shared by the model and the command lines (no heavy imports, so ``--help`` is fast)."""

ATTN_TYPES = ("qq+kk+vv", "qq+kk", "qq", "kk", "vv", "(q+k+v)^2")
"""E-Attn self-correlation attention types (docs/method.md §2)."""

DINO_MODELS = ("none", "dinov2", "dino", "sam")
"""Vision foundation model of D-Attn: none = Crane, dinov2 = Crane+, dino / sam = ablations."""

IMAGE_TOKEN_TYPES = ("none", "replace_prefix", "replace_suffix", "pad_prefix", "pad_suffix")
"""Where the image embedding enters the prompts when they are image-conditioned."""

AUPRO_METHODS = ("crane", "mvtec")
"""AUPRO definitions of :func:`crane.metrics.aupro`."""

PRECISIONS = ("fp32", "bf16", "fp16")
"""``--precision`` of the backbones: fp32 (the published arithmetic, the default), bf16 or fp16 autocast."""


def precision_error(precision: str, device: str) -> "str | None":
    """Why ``precision`` cannot run on ``device`` (``cpu``, ``cuda``, ``cuda:N``, ...), as one line; ``None`` if it can."""
    if precision not in PRECISIONS:
        return f"--precision must be one of {', '.join(PRECISIONS)}, got {precision!r}"
    if precision == "fp16" and not str(device).startswith("cuda"):
        return "--precision fp16 needs a GPU (CUDA); on the CPU use bf16 or fp32"
    return None
