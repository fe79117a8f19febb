"""Shared fixtures: the conformance folder and cached synthetic weights.

The conformance data: the full set in ``../shared/conformance`` beside the checkout (or
``$CRANE_CONFORMANCE``) when it is there, else the subset that ships in ``tests/conformance``
(its README says which cases). A test needing a case the subset lacks skips, naming it.
"""
from __future__ import annotations

import functools
import importlib.util
import json
import os
from pathlib import Path
from typing import Any, Sequence

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(max(1, os.cpu_count() or 1))

REPO = Path(__file__).resolve().parents[1]
FULL_CONFORMANCE = Path(os.environ.get("CRANE_CONFORMANCE", REPO.parent / "shared" / "conformance"))
SHIPPED_CONFORMANCE = REPO / "tests" / "conformance"


def _complete(folder: Path) -> bool:
    return (folder / "synth.py").is_file() and (folder / "cases.json").is_file()


CONFORMANCE = FULL_CONFORMANCE if _complete(FULL_CONFORMANCE) else SHIPPED_CONFORMANCE
"""The conformance folder the tests read: the full set, else the shipped subset."""
CONFORMANCE_IS_SUBSET = CONFORMANCE == SHIPPED_CONFORMANCE
SKIP_REASON = (f"conformance data not found: neither the full set at {FULL_CONFORMANCE} (../shared/conformance "
               f"beside the checkout, or $CRANE_CONFORMANCE) nor the shipped subset at {SHIPPED_CONFORMANCE}")


def conformance_available() -> bool:
    return _complete(CONFORMANCE)


def missing_reason(what: str) -> str:
    """Why a test needing ``what`` (a case, a file of the conformance data) skips."""
    if not conformance_available():
        return SKIP_REASON
    if CONFORMANCE_IS_SUBSET:
        return (f"{what} is not in the shipped conformance subset ({SHIPPED_CONFORMANCE}); the full set at "
                f"{FULL_CONFORMANCE} (not found) has it")
    return f"{what} not found in the conformance data at {CONFORMANCE}"


def conformance_cases(train_step: bool = False) -> list[dict[str, Any]]:
    """The inference cases of ``cases.json`` (only those with a training step when ``train_step``)."""
    if not conformance_available():
        return []
    cases = json.loads((CONFORMANCE / "cases.json").read_text(encoding="utf-8"))["cases"]
    return [c for c in cases if c.get("train_step") or not train_step]


def conformance_case(name: str) -> dict[str, Any]:
    """The case ``name`` of ``cases.json``; skips (saying why) when the data at hand lacks it."""
    for case in conformance_cases():
        if case["name"] == name and (CONFORMANCE / "cases" / name / "expected.npz").is_file():
            return case
    pytest.skip(missing_reason(f"conformance case {name!r}"))


def params_or_skip(values: Sequence[Any], ids: Sequence[str], what: str) -> list:
    """``pytest.param`` per value for ``parametrize``; none found: one skipped test that says why
    (instead of pytest's "got empty parameter set")."""
    if values:
        return [pytest.param(v, id=i) for v, i in zip(values, ids)]
    return [pytest.param(None, id="none", marks=pytest.mark.skip(reason=missing_reason(what)))]


@functools.lru_cache(maxsize=1)
def load_synth():
    """Import ``synth.py`` from the conformance folder."""
    spec = importlib.util.spec_from_file_location("crane_conformance_synth", CONFORMANCE / "synth.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def synth():
    if not conformance_available():
        pytest.skip(SKIP_REASON)
    return load_synth()


@pytest.fixture(scope="session")
def conformance_dir() -> Path:
    if not conformance_available():
        pytest.skip(SKIP_REASON)
    return CONFORMANCE


@pytest.fixture(scope="session")
def synth_weights(synth, tmp_path_factory):
    """``get(kind, **kwargs) -> Path``: synthetic weights saved once per session as a file.

    ``kind="clip"`` writes an OpenAI-format ``.pt`` state dict, ``kind="dino"`` a timm
    DINOv2 state dict, so the file-loading paths are what the tests exercise.
    """
    folder = tmp_path_factory.mktemp("synth_weights")
    cache: dict[tuple, Path] = {}

    def get(kind: str, **kwargs) -> Path:
        key = (kind, tuple(sorted(kwargs.items())))
        if key not in cache:
            sd = synth.clip_state_dict(**kwargs) if kind == "clip" else synth.dinov2_state_dict(**kwargs)
            path = folder / f"{kind}_{abs(hash(key))}.pt"
            torch.save(sd, path)
            cache[key] = path
        return cache[key]

    return get


# ------------------------------------------------------------------ python -m crane (test_cli, test_calibrate)

CLI_IMAGE_SIZE = 56
"""Model input side of the command-line tests (four 14-pixel patches)."""


@pytest.fixture(scope="module")
def model_flags(synth_weights) -> list[str]:
    """Flags of a small Crane model: synthetic CLIP (narrow vision tower, 24 blocks) on the CPU."""
    return ["--clip_weights", str(synth_weights("clip", vision_width=256, seed=0)), "--image_size",
            str(CLI_IMAGE_SIZE), "--dino_model", "none", "--device", "cpu", "--batch_size", "3"]


@pytest.fixture(scope="module")
def official_checkpoint(conformance_dir) -> Path:
    """An official Crane checkpoint (recognised by its SHA-256: Crane settings)."""
    return conformance_dir / "checkpoints" / "trained_on_mvtec_crane" / "epoch_5.pth"


@pytest.fixture(scope="module")
def detectors():
    """Cache ``crane.cli.common.load_detector`` by checkpoint content and model options (the first build is the real one)."""
    import hashlib

    from crane import settings
    from crane.cli import common

    cache: dict[str, object] = {}
    real = common.load_detector

    def cached(args, state, info):
        digest = hashlib.sha256(Path(args.checkpoint).read_bytes()).hexdigest()
        key = repr((digest, sorted(settings.recorded(args, "thresholds").items()), args.device, args.precision))
        if key not in cache:
            cache[key] = real(args, state, info)
        return cache[key]

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(common, "load_detector", cached)
        yield cache


def record_predicted_batches(monkeypatch) -> list[list[str]]:
    """From now on, every batch ``test.py`` predicts, as the ``img_path`` of its images, in order."""
    from crane.engine import evaluate

    seen: list[list[str]] = []
    real = evaluate._predict_batches

    def recording(detector, dataset, batches, *args, **kwargs):
        seen.extend([dataset.samples[i]["img_path"] for i in batch] for batch in batches)
        return real(detector, dataset, batches, *args, **kwargs)

    monkeypatch.setattr(evaluate, "_predict_batches", recording)
    return seen


def predicted_classes(batches: list[list[str]]) -> list[str]:
    """The classes of recorded batches (the first folder of each image path), in order, once each."""
    return list(dict.fromkeys(path.split("/")[0] for batch in batches for path in batch))


def interrupt_at_class_metrics(monkeypatch, n: int) -> None:
    """A simulated Ctrl-C while the ``n``-th class's metrics are computed."""
    from crane.engine import evaluate

    calls = []
    real = evaluate.class_metrics

    def interrupting(*args, **kwargs):
        calls.append(1)
        if len(calls) == n:
            raise KeyboardInterrupt("simulated interruption")
        return real(*args, **kwargs)

    monkeypatch.setattr(evaluate, "class_metrics", interrupting)


def edit_image(path) -> None:
    """Change one pixel of an image file, keeping its format and size."""
    from PIL import Image

    image = Image.open(path)
    image.load()
    pixels = image.load()
    first = pixels[0, 0]
    pixels[0, 0] = tuple(255 - v for v in first) if isinstance(first, tuple) else 255 - first
    image.save(path)


def tiny_dinov2(size: int, perturb_norms: bool = False):
    """A small ``vit_*_patch14_reg4_dinov2``-shaped timm model (width 96, 2 blocks) inside the real VFM wrapper;
    ``perturb_norms``: its 1-d parameters moved off their trivial 1 / 0 initialisation."""
    import timm.models.vision_transformer as vt

    from crane.models.vfm import VFMS, VisionFoundationModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        vit = vt.VisionTransformer(img_size=size, patch_size=14, embed_dim=96, depth=2, num_heads=2, reg_tokens=4,
                                   no_embed_class=True, init_values=0.5, dynamic_img_size=True, num_classes=0)
        if perturb_norms:
            for p in vit.parameters():
                if p.ndim == 1:
                    p.data.add_(0.1 * torch.randn_like(p))
    return VisionFoundationModel("dinov2", vit.eval().requires_grad_(False), VFMS["dinov2"])
