"""Option values shared by the model and the command lines (no heavy imports, so ``--help`` is fast)."""

ATTN_TYPES = ("qq+kk+vv", "qq+kk", "qq", "kk", "vv", "(q+k+v)^2")
"""E-Attn self-correlation attention types (docs/method.md §2)."""

DINO_MODELS = ("none", "dinov2", "dino", "sam")
"""Vision foundation model of D-Attn: none = Crane, dinov2 = Crane+, dino / sam = ablations."""

IMAGE_TOKEN_TYPES = ("none", "replace_prefix", "replace_suffix", "pad_prefix", "pad_suffix")
"""Where the image embedding enters the prompts when they are image-conditioned."""

AUPRO_METHODS = ("crane", "mvtec")
"""AUPRO definitions of :func:`crane.metrics.aupro`."""
