"""Which device a run computes on: one resolution for every entry point, and the precisions a device can run.

Torch is imported only to ask whether CUDA is there.
"""
from __future__ import annotations

from typing import Optional, Sequence

from crane.errors import CraneError
from crane.settings import PRECISIONS


class DeviceError(CraneError):
    """A ``--device`` / ``--devices`` value this machine cannot serve (one-line message)."""


DEVICE_HELP = "cpu, cuda, cuda:N, N (GPU N) or auto: a GPU when there is one, else the CPU"


def resolve_device(device: str, devices: Optional[Sequence[int]] = None, index_falls_back_to_cpu: bool = False
                   ) -> tuple[str, list[int]]:
    """``--device`` and ``--devices`` -> (``"cpu"`` or ``"cuda"``, one index per process).

    ``device``: :data:`DEVICE_HELP`; ``devices``: the GPU indices of several processes (with the CPU,
    their number is the number of CPU processes). ``index_falls_back_to_cpu``: a bare ``N`` on a machine
    without a GPU runs on the CPU (as the published train.py does) instead of failing.
    Raises :class:`DeviceError` before any model work.
    """
    import torch

    value = str(device).strip().lower()
    index: Optional[int] = None
    if value == "auto":
        kind = "cuda" if torch.cuda.is_available() else "cpu"
    elif value in ("cpu", "cuda"):
        kind = value
    elif value.removeprefix("cuda:").isdigit():
        kind, index = "cuda", int(value.removeprefix("cuda:"))
    else:
        raise DeviceError(f"--device must be {DEVICE_HELP}; got {device!r}")
    chosen = [int(d) for d in devices] if devices else [index or 0]
    if devices and index is not None and chosen != [index]:
        raise DeviceError(f"--device {device} and --devices {' '.join(map(str, chosen))} disagree; give one of them")
    if kind == "cuda" and not torch.cuda.is_available():
        if index is not None and value.isdigit() and index_falls_back_to_cpu:
            return "cpu", [int(d) for d in devices] if devices else [0]  # one CPU process
        raise DeviceError(f"--device {device} asks for a GPU but CUDA is not available here; pass --device cpu")
    if kind == "cuda":
        bad = [d for d in chosen if not 0 <= d < torch.cuda.device_count()]
        if bad:
            raise DeviceError(f"GPU {bad[0]} does not exist (this machine has {torch.cuda.device_count()})")
    return kind, chosen




def single_device(device: str) -> str:
    """``--device`` of a one-process command (``predict``, ``calibrate``, ``export``, the app) -> a torch
    device string: ``cpu``, ``cuda`` or ``cuda:N`` (an explicit index kept). Raises :class:`DeviceError`."""
    kind, devices = resolve_device(device)
    explicit = str(device).strip().lower() not in ("auto", "cpu", "cuda")
    return f"cuda:{devices[0]}" if kind == "cuda" and explicit else kind


def precision_error(precision: str, device: str) -> Optional[str]:
    """Why ``precision`` cannot run on ``device`` (``cpu``, ``cuda``, ``cuda:N``, ...), as one line; ``None`` if it can."""
    if precision not in PRECISIONS:
        return f"--precision must be one of {', '.join(PRECISIONS)}, got {precision!r}"
    if precision == "fp16" and not str(device).startswith("cuda"):
        return "--precision fp16 needs a GPU (CUDA); on the CPU use bf16 or fp32"
    return None
