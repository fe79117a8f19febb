"""The built-in demo data: procedural textures with painted defects and their masks.

Usage::

    python -m datasets.synthetic ROOT [--classes N] [--train N] [--test_normal N]
                                      [--test_anomalous N] [--size S] [--seed K] [--overwrite]

(Flags are spelled with underscores, as in every entry point; ``--test-normal`` is accepted too.)

Each class is a texture family (stripes, blotches, grid, fibres, marble, dots,
then the same again with other parameters) with its own colours and scale;
every image varies phase and noise. Anomalous test images carry a scratch, a
blob or a crack, drawn with the same strokes into a binary mask. Files follow
the custom layout (``datasets.custom``): ``train/CLASS/good/NNN.png``,
``test/CLASS/good/NNN.png``, ``test/CLASS/DEFECT/NNN.png`` and
``test/CLASS/masks/NNN_mask.png``; then ``meta.json`` is written by the custom
generator. The same arguments give byte-identical files.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from crane.data.meta import DatasetError
from datasets.common import count_table
from datasets.generate import generate

TEXTURES = ("stripes", "blotches", "grid", "fibres", "marble", "dots")
DEFECTS = ("scratch", "blob", "crack")


@dataclass(frozen=True)
class Style:
    """What every image of one class shares."""

    kind: str
    colors: np.ndarray  # 2 x 3, in [0, 1]
    frequency: float
    angle: float


def class_names(count: int) -> list[str]:
    """``stripes``, ``blotches``, ... then ``stripes_1``, ``blotches_1``, ..."""
    return [TEXTURES[i % len(TEXTURES)] + (f"_{i // len(TEXTURES)}" if i >= len(TEXTURES) else "")
            for i in range(count)]


def _style(index: int, seed: int) -> Style:
    rng = np.random.default_rng([seed, index])
    base = rng.uniform(0.2, 0.8, 3)
    other = np.clip(base + rng.choice([-1.0, 1.0], 3) * rng.uniform(0.15, 0.35, 3), 0.0, 1.0)
    return Style(TEXTURES[index % len(TEXTURES)], np.stack([base, other]), rng.uniform(3.0, 9.0),
                 rng.uniform(0.0, math.pi))


def _smooth_noise(rng: np.random.Generator, size: int, cells: tuple[int, int]) -> np.ndarray:
    """Bicubically upsampled uniform noise in [0, 1], ``size x size``."""
    low = Image.fromarray(rng.random(cells).astype(np.float32))
    high = np.asarray(low.resize((size, size), Image.Resampling.BICUBIC), dtype=np.float64)
    return (high - high.min()) / max(float(np.ptp(high)), 1e-6)


def _texture(style: Style, size: int, rng: np.random.Generator) -> np.ndarray:
    """One ``size x size x 3`` uint8 texture image of ``style``."""
    yy, xx = np.mgrid[0:size, 0:size] / size
    phase = rng.uniform(0.0, 2.0 * math.pi)
    angle = style.angle + rng.normal(0.0, 0.05)
    f = style.frequency
    u = xx * math.cos(angle) + yy * math.sin(angle)
    v = -xx * math.sin(angle) + yy * math.cos(angle)
    if style.kind == "stripes":
        t = 0.5 + 0.5 * np.sin(2.0 * math.pi * f * u + phase)
    elif style.kind == "blotches":
        t = _smooth_noise(rng, size, (round(f), round(f)))
    elif style.kind == "grid":
        t = np.maximum(np.abs(np.sin(math.pi * f * u + phase)), np.abs(np.sin(math.pi * f * v + phase))) ** 8
    elif style.kind == "fibres":
        t = _smooth_noise(rng, size, (4 * round(f), 3))
    elif style.kind == "marble":
        t = 0.5 + 0.5 * np.sin(2.0 * math.pi * f * u + 5.0 * _smooth_noise(rng, size, (4, 4)) + phase)
    else:  # dots
        t = (np.sin(2.0 * math.pi * f * u + phase) * np.sin(2.0 * math.pi * f * v + phase) > 0.5).astype(float)
    t = np.clip(t + rng.normal(0.0, 0.04, t.shape), 0.0, 1.0)[:, :, None]
    rgb = style.colors[0] * (1.0 - t) + style.colors[1] * t
    return np.round(rgb * 255.0).astype(np.uint8)


def _paint_defect(image: Image.Image, kind: str, rng: np.random.Generator) -> Image.Image:
    """Paint a ``kind`` defect onto ``image`` in place; return its binary mask (mode ``L``)."""
    size = image.width
    mask = Image.new("L", image.size, 0)
    mean = np.asarray(image, dtype=np.float64).reshape(-1, 3).mean(axis=0)
    start = rng.uniform(0.25, 0.75, 2) * size
    if kind == "scratch":
        angle = rng.uniform(0.0, 2.0 * math.pi)
        end = start + rng.uniform(0.2, 0.45) * size * np.array([math.cos(angle), math.sin(angle)])
        shape: list[tuple[float, float]] = [tuple(start), tuple(end)]
        color = tuple(int(c) for c in np.where(mean > 127, 20, 235) + rng.integers(-15, 16, 3))
        width = max(1, round(size / 64))
    elif kind == "crack":
        angle = rng.uniform(0.0, 2.0 * math.pi)
        shape = [tuple(start)]
        for _ in range(int(rng.integers(8, 14))):
            angle += rng.normal(0.0, 0.6)
            shape.append((shape[-1][0] + size / 24 * math.cos(angle), shape[-1][1] + size / 24 * math.sin(angle)))
        color = tuple(int(c) for c in mean * 0.25)
        width = max(1, round(size / 96))
    else:  # blob
        radii = rng.uniform(0.05, 0.12, 2) * size
        box = [tuple(start - radii), tuple(start + radii)]
        color = tuple(int(c) for c in np.clip(mean + rng.choice([-1, 1], 3) * rng.uniform(60, 110, 3), 0, 255))
        for target, fill in ((image, color), (mask, 255)):
            ImageDraw.Draw(target).ellipse(box, fill=fill)
        return mask
    for target, fill in ((image, color), (mask, 255)):
        ImageDraw.Draw(target).line(shape, fill=fill, width=width, joint="curve")
    return mask


def make_synthetic_dataset(
    root: str | os.PathLike[str],
    classes: int = 2,
    train: int = 4,
    test_normal: int = 4,
    test_anomalous: int = 4,
    size: int = 128,
    seed: int = 0,
    overwrite: bool = False,
) -> Path:
    """Write the synthetic dataset (custom layout) and its ``meta.json`` into ``root``; return ``root``.

    ``root`` must be empty or missing unless ``overwrite``, which first deletes its
    ``train/``, ``test/`` and ``meta.json``. Deterministic in all arguments.
    """
    if classes < 1 or min(train, test_normal, test_anomalous) < 0 or test_normal + test_anomalous < 1:
        raise DatasetError("need at least one class, non-negative counts and at least one test image per class")
    if size < 16:
        raise DatasetError(f"size must be at least 16 pixels, got {size}")
    root = Path(root)
    if overwrite:
        for folder in ("train", "test"):
            shutil.rmtree(root / folder, ignore_errors=True)
        (root / "meta.json").unlink(missing_ok=True)
    elif root.is_dir() and any(root.iterdir()):
        raise DatasetError(f"{root} is not empty; choose a new folder or pass --overwrite (replaces its train/, "
                           "test/ and meta.json)")
    for index, name in enumerate(class_names(classes)):
        style = _style(index, seed)
        for split, count in (("train", train), ("test", test_normal)):
            for i in range(count):
                rng = np.random.default_rng([seed, index, 0 if split == "train" else 1, i])
                _save(Image.fromarray(_texture(style, size, rng)), root / split / name / "good" / f"{i:03d}.png")
        for i in range(test_anomalous):
            rng = np.random.default_rng([seed, index, 2, i])
            kind = DEFECTS[(i + index) % len(DEFECTS)]
            image = Image.fromarray(_texture(style, size, rng))
            mask = _paint_defect(image, kind, rng)
            _save(image, root / "test" / name / kind / f"{i:03d}.png")
            _save(mask, root / "test" / name / "masks" / f"{i:03d}_mask.png")
    generate("custom", root)
    return root


def _save(image: Image.Image, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format="PNG")


def main(argv: Sequence[str] | None = None) -> int:
    """Command line entry point; returns the exit status (2 on a user error)."""
    parser = argparse.ArgumentParser(prog="python -m datasets.synthetic", description=__doc__.split("\n\n")[0])
    parser.add_argument("root", type=Path, metavar="ROOT", help="folder to create (empty or missing)")
    parser.add_argument("--classes", type=int, default=2, help="number of classes (texture families)")
    parser.add_argument("--train", type=int, default=4, help="normal training images per class")
    parser.add_argument("--test_normal", "--test-normal", type=int, default=4, help="normal test images per class")
    parser.add_argument("--test_anomalous", "--test-anomalous",
                        type=int, default=4, help="defect test images (with masks) per class")
    parser.add_argument("--size", type=int, default=128, help="image side in pixels")
    parser.add_argument("--seed", type=int, default=0, help="random seed; equal seeds give identical files")
    parser.add_argument("--overwrite", action="store_true", help="replace ROOT's train/, test/ and meta.json")
    args = parser.parse_args(argv)
    try:
        root = make_synthetic_dataset(args.root, args.classes, args.train, args.test_normal, args.test_anomalous,
                                      args.size, args.seed, args.overwrite)
    except DatasetError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(count_table(json.loads((root / "meta.json").read_text(encoding="utf-8"))))
    print(f"wrote {root / 'meta.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
