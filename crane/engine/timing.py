"""Where an evaluation spends its time: wall-clock seconds per pipeline stage (``--profile FILE``).

Stages: ``decode`` (waiting for the next batch from the loader), ``model`` (the forward pass),
``smoothing``, ``gather`` (collecting every rank's batch on rank 0), ``files`` (maps, class records,
panels), ``metrics`` (per class; they run in a background thread on rank 0, overlapping the next
class's prediction, so their seconds are not on the critical path). On a GPU each stage ends with a
device synchronisation while profiling (and only then), so the seconds belong to the stage. The
evaluation restarts the clock once the model is built (:meth:`StageTimer.restart`): loading weights
and computing the text features are not throughput.
"""
from __future__ import annotations

import contextlib
import json
import threading
import time
from collections import defaultdict
from pathlib import Path
from typing import Iterator, Optional

import torch

STAGES = ("decode", "model", "smoothing", "gather", "files", "metrics")


class StageTimer:
    """Accumulates seconds per stage; a disabled timer costs nothing."""

    def __init__(self, enabled: bool = False, device: Optional[torch.device] = None) -> None:
        self.enabled = enabled
        self.device = device
        self.seconds: dict[str, float] = defaultdict(float)
        self.images = 0
        self._lock = threading.Lock()
        self._start = time.perf_counter()

    @contextlib.contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        if not self.enabled:
            yield
            return
        start = time.perf_counter()
        try:
            yield
        finally:
            if self.device is not None and self.device.type == "cuda" and stage != "metrics":
                torch.cuda.synchronize(self.device)
            with self._lock:
                self.seconds[stage] += time.perf_counter() - start

    def restart(self) -> None:
        """Forget what was counted and start the wall clock again."""
        with self._lock:
            self.seconds.clear()
            self.images = 0
            self._start = time.perf_counter()

    def report(self) -> dict:
        """``{"wall_seconds", "images", "images_per_second", "seconds": {stage: s}, "share": {stage: fraction
        of the wall time}}``."""
        wall = time.perf_counter() - self._start
        return {"wall_seconds": wall, "images": self.images,
                "images_per_second": self.images / wall if wall > 0 else None,
                "seconds": {s: self.seconds.get(s, 0.0) for s in STAGES},
                "share": {s: self.seconds.get(s, 0.0) / wall if wall > 0 else None for s in STAGES}}

    def write(self, path: Path) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(self.report(), indent=2) + "\n", encoding="utf-8")
