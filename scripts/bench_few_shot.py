"""Cost of few-shot scoring: ms per image and peak memory against K reference images and the coreset ratio,
with zero-shot as the baseline in the same run.

One Crane detector (features 6 12 18 24, soft_mean; with ``--dino`` Crane+ with a random DINOv2 ViT-B/14-reg4,
features 24) on random CLIP weights: ``--widths full`` gives the ViT-L/14 widths (vision 1024), ``narrow`` the
demo model's (vision 256; ``crane.models.synthetic``). Images are procedural textures (deterministic).

For each K and coreset ratio the memory is built from K images (``Detector.set_reference``: encoding,
coreset, the references' statistics; "build s"), then ``Detector.predict`` scores ``--test-images`` other images
per repeat (torch search); zero-shot (no memory) is timed the same way, all runs in a new random order each
round, so load from other processes spreads over all of them. "ms/image" is the median over repeats;
"x zero-shot" its ratio to the zero-shot median; "search ms/image" the nearest-neighbour search alone
(``ReferenceMemory.distances`` on the test images' features, median over repeats) with torch and with faiss. "peak RSS MiB" is the largest increase of the process's memory while predicting (resident set
size sampled every millisecond on the CPU, which misses what the allocator reuses; exact on a GPU:
``torch.cuda.max_memory_allocated``), "search buffer MiB" the similarities the torch search holds at a time
(``B L x min(rows, 4096)`` float32), "memory MiB" the banks' size. The faiss column needs
``pip install faiss-cpu`` (exact index; distances equal torch's to float rounding).

    .venv/bin/python scripts/bench_few_shot.py --widths full --image-size 224 --k 1 4 16 64 --ratios 1 0.1
"""
from __future__ import annotations

import argparse
import os
import random
import statistics
import threading
import time
from typing import Callable

import numpy as np
import torch
from tabulate import tabulate

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import crane  # noqa: E402
from crane.data.image import preprocess  # noqa: E402
from crane.models.memory import ReferenceMemory, faiss_available, memory_queries  # noqa: E402
from crane.models.synthetic import synthetic_clip_state_dict  # noqa: E402


def texture(size: int, seed: int, defect: bool = False) -> np.ndarray:
    """A ``size x size x 3`` uint8 stripe texture with noise and a random phase; ``defect`` adds a dark blob."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    phase = rng.uniform(0, 2 * np.pi)
    img = 0.5 + 0.25 * np.sin(2 * np.pi * (6 * xx + 2 * yy) + phase)[..., None] * np.array([1.0, 0.8, 0.6])
    img = img + 0.04 * rng.standard_normal((size, size, 3))
    if defect:
        cy, cx = rng.uniform(0.3, 0.7, 2)
        img[((yy - cy) ** 2 + (xx - cx) ** 2) < 0.004] = 0.1
    return np.clip(img * 255, 0, 255).astype(np.uint8)


class PeakMemory:
    """Largest increase of memory in use inside the ``with`` block, in MB: the process's resident set size
    sampled every millisecond (CPU), or ``torch.cuda.max_memory_allocated`` (GPU)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.peak_mb = 0.0

    @staticmethod
    def _rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self._base = torch.cuda.memory_allocated()
            return self
        self._base = self._peak = self._rss()
        self._stop = threading.Event()

        def sample() -> None:
            while not self._stop.wait(0.001):
                self._peak = max(self._peak, self._rss())

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.peak_mb = (torch.cuda.max_memory_allocated() - self._base) / 2**20
            return
        self._stop.set()
        self._thread.join()
        self.peak_mb = (max(self._peak, self._rss()) - self._base) / 2**20


def timed(fn: Callable[[], object], device: torch.device) -> tuple[float, float]:
    """``(seconds, peak MB)`` of one call."""
    with PeakMemory(device) as peak:
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
    return seconds, peak.peak_mb


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--widths", choices=("narrow", "full"), default="narrow",
                        help="random CLIP of the demo's narrow widths (vision 256) or ViT-L/14's (vision 1024)")
    parser.add_argument("--dino", action="store_true", help="Crane+ (random DINOv2, features 24)")
    parser.add_argument("--image-size", type=int, default=224, help="model input size S (default 224)")
    parser.add_argument("--k", type=int, nargs="+", default=[1, 4, 16, 64], help="reference images K")
    parser.add_argument("--ratios", type=float, nargs="+", default=[1.0, 0.25, 0.1], help="coreset ratios")
    parser.add_argument("--test-images", type=int, default=4, help="images scored per timed call (one batch)")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per configuration (default 3)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    size = args.image_size

    t0 = time.perf_counter()
    clip_sd = synthetic_clip_state_dict(vision_width=1024 if args.widths == "full" else 256)
    dino_sd = None
    if args.dino:
        import timm

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(1)
            dino_sd = dict(timm.create_model("vit_base_patch14_reg4_dinov2", pretrained=False, num_classes=0,
                                             img_size=518).state_dict())
    options = dict(features_list=(24,), soft_mean=False) if args.dino else dict(features_list=(6, 12, 18, 24),
                                                                                soft_mean=True)
    torch.manual_seed(0)
    det = crane.Detector.from_config(clip_weights=clip_sd, dino_model="dinov2" if args.dino else "none",
                                     dino_weights=dino_sd, image_size=size, device=args.device,
                                     batch_size=max(args.test_images, 8), **options)
    tests = [texture(size, 10_000 + i, defect=i % 2 == 1) for i in range(args.test_images)]
    det.predict(tests)  # warm-up
    print(f"built the model in {time.perf_counter() - t0:.1f} s; {args.widths} widths, "
          f"{'Crane+ (dinov2, features 24)' if args.dino else 'Crane (features 6 12 18 24, soft_mean)'}, "
          f"S {size}, {args.device}, threads {torch.get_num_threads()}", flush=True)

    backends = ["torch"] + (["faiss"] if device.type == "cpu" and faiss_available() else [])
    configs = [(k, r) for k in args.k for r in args.ratios]
    memories: dict[tuple[int, float], tuple[ReferenceMemory, float]] = {}
    for k, ratio in configs:
        refs = [texture(size, i) for i in range(k)]
        start = time.perf_counter()
        memory = det.set_reference(refs, coreset_ratio=ratio)
        memories[(k, ratio)] = (memory, time.perf_counter() - start)
        print(f"K {k:3d} ratio {ratio:<5}: {sum(b.features.shape[0] for b in memory.banks)} rows in "
              f"{len(memory.banks)} bank(s), built in {memories[(k, ratio)][1]:.1f} s", flush=True)

    features = det.encode(torch.stack([preprocess(t, size) for t in tests]))
    predicts: dict[tuple, list[tuple[float, float]]] = {("zero-shot",): []}
    predicts.update({key: [] for key in configs})
    searches: dict[tuple, list[float]] = {(k, r, b): [] for (k, r) in configs for b in backends}

    def run(key: tuple) -> None:
        if len(key) == 3:  # the search alone, with one backend
            memory = memories[key[:2]][0]
            memory.backend = key[2]
            queries = memory_queries(features, memory.spec.sets, memory.spec.use_vfm)
            searches[key].append(timed(lambda: memory.distances(queries), device)[0])
            memory.backend = "torch"
            return
        det.set_reference(None if key == ("zero-shot",) else memories[key][0])
        predicts[key].append(timed(lambda: det.predict(tests), device))

    keys = list(predicts) + list(searches)
    for key in keys:  # warm-up (faiss builds its index here)
        run(key)
        (predicts.get(key) or searches[key]).clear()
    order = random.Random(0)
    for r in range(args.repeats):
        for key in order.sample(keys, len(keys)):  # a new order each round: load from other processes spreads
            run(key)
        print(f"repeat {r + 1}/{args.repeats} done", flush=True)

    def ms(values: list[float]) -> float:
        return 1000.0 * statistics.median(values) / len(tests)

    base = ms([t for t, _ in predicts[("zero-shot",)]])
    rows = [["zero-shot", "-", "-", "-", "-", "-", f"{base:.1f}", "1.00", "-", "-", "-",
             f"{max(p for _, p in predicts[('zero-shot',)]):.0f}"]]
    queries = len(tests) * memories[configs[0]][0].spec.patches_per_image
    for key in configs:
        memory, build = memories[key]
        rows_per_bank = [b.features.shape[0] for b in memory.banks]
        predict_ms = ms([t for t, _ in predicts[key]])
        search = [f"{ms(searches[key + (b,)]):.1f}" for b in backends]
        rows.append([key[0], key[1], sum(rows_per_bank), f"{memory.nbytes() / 2**20:.1f}", f"{max(memory.radii):.4f}",
                     f"{build:.1f}", f"{predict_ms:.1f}", f"{predict_ms / base:.2f}", *search,
                     *([] if len(backends) == 2 else ["-"]),
                     f"{queries * min(max(rows_per_bank), memory.chunk) * 4 / 2**20:.0f}",
                     f"{max(p for _, p in predicts[key]):.0f}"])
    print(tabulate(rows, headers=["K", "coreset", "memory rows", "memory MiB", "radius", "build s", "ms/image",
                                  "x zero-shot", "search ms/image (torch)", "search ms/image (faiss)",
                                  "search buffer MiB", "peak RSS MiB"], tablefmt="github"))


if __name__ == "__main__":
    main()
