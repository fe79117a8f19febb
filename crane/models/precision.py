"""Reduced-precision backbones and optional ``torch.compile`` (``--precision``, ``--compile``).

Only the frozen image side runs under autocast: the CLIP vision tower with E-Attn and
D-Attn, and the VFM. The text features and the head (patch logits, maps, scores) stay
float32, and the token sets and embeddings leave the image side as float32 (they are
normalised in float32). ``fp32`` is the default and the published arithmetic; ``bf16`` and
``fp16`` change the numbers a little (the README's Speed section gives the measured drift).
"""
from __future__ import annotations

import contextlib
import logging
from typing import Any, Callable, ContextManager, Iterator, Optional

import torch

from ..settings import PRECISIONS as PRECISION_NAMES

log = logging.getLogger(__name__)

PRECISIONS = dict(zip(PRECISION_NAMES, (torch.float32, torch.bfloat16, torch.float16)))
"""``--precision`` name -> autocast dtype (``fp32``: no autocast)."""


def autocast(device_type: str, precision: str) -> ContextManager:
    """Where the image side runs: the autocast context of ``precision`` on a device of ``device_type``.

    ``fp32`` is IEEE float32 on every device: on a GPU, TF32 is off inside the context (cuDNN
    would otherwise run the patch-embedding convolutions in TF32, its default), so CUDA and CPU
    agree to float32 rounding.
    """
    if precision != "fp32":
        return torch.autocast(device_type, dtype=PRECISIONS[precision])
    return _no_tf32() if device_type == "cuda" else contextlib.nullcontext()


@contextlib.contextmanager
def _no_tf32() -> Iterator[None]:
    before = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = before


class CompiledOrEager:
    """``fn`` through ``torch.compile`` (which compiles at the first call, and again for new shapes).

    If compiling fails, ``fn`` runs as it is from then on and one warning line says so. An
    error of the computation itself is raised by the uncompiled call, so it is never hidden.
    """

    def __init__(self, fn: Callable[..., Any], what: str) -> None:
        self.fn, self.what = fn, what
        self._compiled: Optional[Callable[..., Any]] = None
        try:
            self._compiled = torch.compile(fn)
        except Exception as e:  # e.g. a Python version torch.compile does not support
            self._give_up(e)

    def _give_up(self, error: Exception) -> None:
        self._compiled = None
        first = (str(error).strip().splitlines() or [""])[0][:200]
        log.warning("--compile: compiling %s failed (%s: %s); running it uncompiled", self.what,
                    type(error).__name__, first)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self._compiled is None:
            return self.fn(*args, **kwargs)
        try:
            return self._compiled(*args, **kwargs)
        except Exception as e:
            out = self.fn(*args, **kwargs)  # raises here when the computation itself is at fault
            self._give_up(e)
            return out


def maybe_compiled(fn: Callable[..., Any], enabled: bool, what: str) -> Callable[..., Any]:
    """``fn`` itself, or with ``enabled`` a :class:`CompiledOrEager` of it."""
    return CompiledOrEager(fn, what) if enabled else fn
