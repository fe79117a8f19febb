"""scripts/gpu_check.sh's front door (help, bad arguments, the version check that stops it in one line) and
scripts/gpu_versions.py's rules. The steps themselves run with ``GPU_CHECK_DEVICE=cpu bash scripts/gpu_check.sh``
(minutes; not part of the suite)."""
from __future__ import annotations

import importlib.util
import os
import stat
import subprocess
from pathlib import Path

import pytest

from tests.conftest import REPO

SCRIPT = REPO / "scripts" / "gpu_check.sh"


@pytest.fixture(scope="module")
def gpu_versions():
    spec = importlib.util.spec_from_file_location("crane_test_gpu_versions", REPO / "scripts" / "gpu_versions.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


OPEN_CLIP_33 = ["torch>=2.0", "torchvision", "regex", "ftfy", "timm>=1.0.17", 'pytest; extra == "test"',
                'numpy>=9; extra == "training"']
"""open_clip_torch 3.3.0's requirements as its metadata lists them (the extras made up here, to be ignored)."""


def _versions(**changes):
    return {"torch": "2.11.0+cu130", "timm": "1.0.17", "numpy": "2.5.2", "open_clip_torch": "3.3.0", **changes}


def _needs(gpu_versions, versions):
    return gpu_versions.needs(versions.get, lambda name: OPEN_CLIP_33 if name == "open_clip_torch" else None)


def test_open_clips_own_floor_joins_cranes(gpu_versions):
    wanted = _needs(gpu_versions, _versions())
    assert (">=1.0.17", "open_clip_torch 3.3.0") in wanted["timm"]
    assert (">=1.0.15", "crane") in wanted["timm"]
    assert wanted["numpy"] == [(">=2.0", "crane")]  # extras are no needs
    assert [who for _, who in wanted["torch"]] == ["crane", "open_clip_torch 3.3.0"]


def test_the_image_as_described_passes(gpu_versions):
    versions = _versions()
    assert gpu_versions.version_problem(versions, _needs(gpu_versions, versions)) is None


@pytest.mark.parametrize("changes, expected", [
    ({"timm": "1.0.16"}, "timm 1.0.16 is older than open_clip_torch 3.3.0 needs (timm>=1.0.17)"),
    ({"timm": "1.0.14"}, "timm 1.0.14 is older than crane needs (timm>=1.0.15)"),
    ({"torch": "2.10.0+cu128"}, "torch 2.10.0+cu128 is older than crane needs (torch>=2.11)"),
    ({"numpy": "1.26.4"}, "numpy 1.26.4 is older than crane needs (numpy>=2.0)"),
    ({"open_clip_torch": None}, "open_clip_torch is not installed"),
])
def test_a_missing_or_old_package_is_one_line(gpu_versions, changes, expected):
    versions = _versions(**changes)
    problem = gpu_versions.version_problem(versions, _needs(gpu_versions, versions))
    assert problem is not None and expected in problem and "\n" not in problem


def test_this_environment_passes_the_version_check(gpu_versions, capsys):
    assert gpu_versions.main(["--device", "cpu"]) == 0
    first = capsys.readouterr().out.splitlines()[0]
    assert first.startswith("python ") and "torch " in first and "timm " in first and "open_clip_torch " in first


def _run(*args: str, env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), *args], cwd=cwd, env={**os.environ, **env}, capture_output=True,
                          text=True, timeout=60)


def test_help_prints_the_header_and_runs_nothing(tmp_path):
    run = _run("--help", env={"PYTHON": str(tmp_path / "no_python")}, cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    assert "bash scripts/gpu_check.sh [OUT_DIR]" in run.stdout and "GPU_CHECK_DEVICE=cpu" in run.stdout
    assert list(tmp_path.iterdir()) == []


def test_an_unknown_option_is_one_line(tmp_path):
    run = _run("--fast", env={}, cwd=tmp_path)
    assert run.returncode == 2 and run.stderr.count("\n") == 1 and "--fast" in run.stderr


def test_a_failed_version_check_stops_the_check_before_any_step(tmp_path):
    """gpu_versions.py's verdict (here a stand-in python that reports an old timm) ends the check: exit 2, its
    one line, the versions printed first, and no step run (no figures, no logs)."""
    fake = tmp_path / "python"
    fake.write_text('#!/bin/sh\ncase "$1" in\n'
                    '  -m) exit 0 ;;\n'  # pip installing .whl/ where a checkout has one
                    '  */gpu_versions.py) echo "python 3.12.3, torch 2.11.0, timm 1.0.16"\n'
                    '    echo "gpu_check.sh: timm 1.0.16 is older than open_clip_torch 3.3.0 needs" >&2; exit 2 ;;\n'
                    'esac\necho "unexpected: $*" >&2; exit 3\n')
    fake.chmod(fake.stat().st_mode | stat.S_IXUSR)
    out = tmp_path / "out"
    run = _run(str(out), env={"PYTHON": str(fake), "GPU_CHECK_DEVICE": "cpu"}, cwd=tmp_path)
    assert run.returncode == 2
    assert run.stderr.splitlines() == ["gpu_check.sh: timm 1.0.16 is older than open_clip_torch 3.3.0 needs"]
    assert run.stdout.splitlines()[-1] == "python 3.12.3, torch 2.11.0, timm 1.0.16"
    assert list(out.iterdir()) == []
