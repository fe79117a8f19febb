"""The conformance subset shipped in ``tests/conformance``: small, unchanged, and what a fresh clone reads."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest

from tests.conftest import FULL_CONFORMANCE, REPO, SHIPPED_CONFORMANCE

spec = importlib.util.spec_from_file_location("crane_conformance_subset", REPO / "scripts" / "conformance_subset.py")
subset = importlib.util.module_from_spec(spec)
spec.loader.exec_module(subset)

FULL_PRESENT = (FULL_CONFORMANCE / "cases.json").is_file()


def test_subset_is_small_and_holds_what_its_readme_lists():
    files = [p for p in SHIPPED_CONFORMANCE.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) <= subset.LIMIT_BYTES
    cases = json.loads((SHIPPED_CONFORMANCE / "cases.json").read_text())["cases"]
    assert [c["name"] for c in cases] == list(subset.CASES)
    assert {c["args"]["dino_model"] for c in cases} == {"none", "dinov2"}  # Crane and Crane+
    assert any(c.get("train_step") for c in cases)
    for case in cases:
        assert (SHIPPED_CONFORMANCE / "cases" / case["name"] / "expected.npz").is_file()
        assert (SHIPPED_CONFORMANCE / case["checkpoint"]).is_file()
    for name in ("synth.py", "metrics_expected.json", "README.md", "pipeline/crane_test.json",
                 "pipeline/cranep_test.json", "pipeline/make_dataset.py", "pipeline/train_crane/trace.json"):
        assert (SHIPPED_CONFORMANCE / name).is_file(), name


@pytest.mark.skipif(not FULL_PRESENT, reason=f"the full conformance set is not at {FULL_CONFORMANCE}, so the "
                                             "shipped copy cannot be compared with it")
def test_subset_files_equal_the_full_set():
    for relative in subset.COPIED:
        source = FULL_CONFORMANCE / relative
        for path in ([p for p in source.rglob("*") if p.is_file()] if source.is_dir() else [source]):
            name = subset.target_name(path.relative_to(FULL_CONFORMANCE).as_posix())
            assert (SHIPPED_CONFORMANCE / name).read_bytes() == path.read_bytes(), name
    shipped = json.loads((SHIPPED_CONFORMANCE / "cases.json").read_text())
    assert shipped == subset.subset_cases(FULL_CONFORMANCE)


def test_without_the_full_set_the_tests_read_the_shipped_subset(tmp_path):
    code = ("from tests.conftest import CONFORMANCE, CONFORMANCE_IS_SUBSET, conformance_cases, missing_reason; "
            "print(CONFORMANCE); print(CONFORMANCE_IS_SUBSET); print([c['name'] for c in conformance_cases()]); "
            "print(missing_reason('case x'))")
    env = {**os.environ, "CRANE_CONFORMANCE": str(tmp_path / "absent")}
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                         check=True, timeout=120).stdout.splitlines()
    assert out[0] == str(SHIPPED_CONFORMANCE) and out[1] == "True"
    assert out[2] == str(list(subset.CASES))
    assert "shipped conformance subset" in out[3] and str(tmp_path / "absent") in out[3]
