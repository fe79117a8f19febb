"""Shared fixtures: the conformance folder and cached synthetic weights.

The conformance data lives in ``../shared/conformance`` beside the checkout; tests
that need it skip with a clear reason when it is absent.
"""
from __future__ import annotations

import functools
import importlib.util
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(max(1, os.cpu_count() or 1))

REPO = Path(__file__).resolve().parents[1]
CONFORMANCE = Path(os.environ.get("CRANE_CONFORMANCE", REPO.parent / "shared" / "conformance"))
SKIP_REASON = (f"conformance data not found at {CONFORMANCE} (expected ../shared/conformance beside the "
               "checkout, or set CRANE_CONFORMANCE)")


def conformance_available() -> bool:
    return (CONFORMANCE / "synth.py").is_file() and (CONFORMANCE / "cases.json").is_file()


@functools.lru_cache(maxsize=1)
def load_synth():
    """Import ``synth.py`` from the conformance folder (never copied into the repo)."""
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
