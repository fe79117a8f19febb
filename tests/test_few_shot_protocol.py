"""``test.py --few_shot K``: the research protocol of the few-shot mode (issue 18, item 2).

A tiny synthetic CLIP (24 blocks of width 256) at 56 px with the official Crane checkpoint, on the demo
textures (``datasets.synthetic``): the numbers are meaningless, the files and their bookkeeping are not.
"""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from crane.engine.few_shot import FewShotError, draw_references, normal_training_images, spread
from datasets.synthetic import make_synthetic_dataset
from tests.conftest import REPO

SIZE = 56
CHECKPOINT = "checkpoints/trained_on_mvtec_crane/epoch_5.pth"


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    """``ROOT/demo``: 2 classes, 5 normal training images each, 2 normal and 2 defect test images, 64 px."""
    root = tmp_path_factory.mktemp("few_shot_data")
    make_synthetic_dataset(root / "demo", classes=2, train=5, test_normal=2, test_anomalous=2, size=64)
    return root


@pytest.fixture(scope="module")
def base_args(data_root, synth_weights, conformance_dir) -> list[str]:
    return ["--dataset", "demo", "--datasets_root_dir", str(data_root),
            "--checkpoint", str(conformance_dir / CHECKPOINT),
            "--clip_weights", str(synth_weights("clip", vision_width=256, seed=0)), "--dino_model", "none",
            "--features_list", "6", "12", "18", "24", "--soft_mean", "True", "--image_size", str(SIZE),
            "--device", "cpu", "--batch_size", "3", "--num_workers", "0"]


def _run(args: list[str], processes: int = 1) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    extra = ["--devices", *map(str, range(processes))] if processes > 1 else []
    return subprocess.run([sys.executable, str(REPO / "test.py"), *args, *extra], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def two_seeds(base_args, tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    out = tmp_path_factory.mktemp("few_shot_run") / "fs"
    proc = _run([*base_args, "--few_shot", "2", "--few_shot_seeds", "3", "4", "--save_path", str(out)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc


def test_draws_are_deterministic_per_seed_and_class(data_root):
    root = data_root / "demo"
    classes = list(normal_training_images(root))
    a = draw_references(root, classes, 3, seed=7)
    assert a == draw_references(root, classes, 3, seed=7)
    assert draw_references(root, classes[1:], 3, seed=7) == {c: a[c] for c in classes[1:]}  # per class
    assert any(draw_references(root, classes, 3, seed=s) != a for s in range(8, 12))
    for c, paths in a.items():
        assert len(set(paths)) == 3 and set(paths) <= set(normal_training_images(root)[c])


def test_more_shots_than_normal_training_images_is_one_line_naming_the_class(data_root, base_args, tmp_path):
    with pytest.raises(FewShotError, match=r"'blotches' has 5, 'stripes' has 5"):
        draw_references(data_root / "demo", list(normal_training_images(data_root / "demo")), 6, seed=0)
    proc = _run([*base_args, "--few_shot", "6", "--save_path", str(tmp_path / "x")])
    assert proc.returncode == 2
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith("test.py: error: --few_shot 6") and "has 5" in line
    assert not (tmp_path / "x").exists()


def test_a_set_without_normal_training_images_is_refused_before_model_work(base_args, tmp_path):
    """As the medical sets: every image in the test split, none in train."""
    folder = tmp_path / "data" / "med"
    folder.mkdir(parents=True)
    (folder / "img.png").write_bytes(b"")
    meta = {"train": {}, "test": {"brain": [{"img_path": "img.png", "mask_path": "", "cls_name": "brain",
                                            "specie_name": "good", "anomaly": 0}]}}
    (folder / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(FewShotError, match="'brain' has 0"):
        draw_references(folder, ["brain"], 1, seed=0)


def test_seed_folders_summary_and_references_named(two_seeds, data_root):
    out, proc = two_seeds
    assert "3 4 (mean ± sample std)" in proc.stdout
    root = data_root / "demo"
    for seed in (3, 4):
        metrics = json.loads((out / f"seed_{seed}" / "metrics.json").read_text())
        assert metrics["args"]["few_shot"] == 2 and metrics["args"]["few_shot_seed"] == seed
        assert metrics["references"] == draw_references(root, list(metrics["classes"]), 2, seed)
        for cls_name in metrics["classes"]:
            record = json.loads((out / f"seed_{seed}" / "classes" / f"{cls_name}.json").read_text())
            assert [path for path, _ in record["references"]] == metrics["references"][cls_name]
    summary = json.loads((out / "summary.json").read_text())
    runs = [json.loads((out / f"seed_{s}" / "metrics.json").read_text()) for s in (3, 4)]
    for metric, value in summary["mean"].items():
        assert value == spread([r["mean"][metric] for r in runs])
    assert summary["references"]["3"] == runs[0]["references"]
    assert "±" in (out / "summary.md").read_text()


def test_a_rerun_resumes_and_other_references_recompute(two_seeds, base_args):
    out, _ = two_seeds
    proc = _run([*base_args, "--few_shot", "2", "--few_shot_seeds", "3", "--save_path", str(out)])
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "2 of 2 classes already finished" in proc.stderr
    before = (out / "seed_3" / "metrics.json").read_bytes()
    # the same seed with another K draws other references: recomputed, never reused
    proc = _run([*base_args, "--few_shot", "3", "--few_shot_seeds", "3", "--save_path", str(out)])
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "already finished" not in proc.stderr and "from other settings" in proc.stderr
    assert (out / "seed_3" / "metrics.json").read_bytes() != before


def test_two_processes_draw_and_score_the_same(two_seeds, base_args, tmp_path):
    out, _ = two_seeds
    two = tmp_path / "two"
    proc = _run([*base_args, "--few_shot", "2", "--few_shot_seeds", "4", "--save_path", str(two)], processes=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ours, single = (json.loads((p / "seed_4" / "metrics.json").read_text()) for p in (two, out))
    assert ours["references"] == single["references"]
    assert (two / "seed_4" / "predictions.csv").read_bytes() == (out / "seed_4" / "predictions.csv").read_bytes()


def test_zero_shot_files_have_no_few_shot_keys(base_args, tmp_path):
    proc = _run([*base_args, "--coreset_ratio", "0.5", "--save_path", str(tmp_path / "zs")])
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "note: --coreset_ratio has no effect without --few_shot K" in proc.stderr
    metrics = json.loads((tmp_path / "zs" / "metrics.json").read_text())
    assert "references" not in metrics and not {"few_shot", "few_shot_seed", "coreset_ratio"} & set(metrics["args"])
    assert not (tmp_path / "zs" / "seed_111").exists()


def test_few_shot_seeds_without_few_shot_is_one_line(base_args, tmp_path):
    proc = _run([*base_args, "--few_shot_seeds", "1", "2", "--save_path", str(tmp_path / "x")])
    assert proc.returncode == 2 and "--few_shot_seeds needs --few_shot K" in proc.stderr


def test_make_table_puts_few_shot_columns_beside_zero_shot(tmp_path, capsys):
    from tests.test_evaluate import METRIC_NAMES, _load_make_table

    make_table = _load_make_table()
    zero = dict(zip(METRIC_NAMES, (0.5, 0.5, 0.5, 0.6, 0.4, 0.1)))
    for method in ("crane", "cranep"):
        (tmp_path / method / "mvtec").mkdir(parents=True)
        (tmp_path / method / "mvtec" / "metrics.json").write_text(json.dumps({"mean": zero, "args": {}}))
    seeds = {"image_auroc": [0.8, 0.9], "pixel_auroc": [0.7, 0.9]}
    mean = {m: spread(seeds.get(m, [0.5, 0.5])) for m in METRIC_NAMES}
    (tmp_path / "crane_fewshot_4" / "mvtec").mkdir(parents=True)
    (tmp_path / "crane_fewshot_4" / "mvtec" / "summary.json").write_text(json.dumps({"mean": mean, "args": {}}))
    assert make_table.main([str(tmp_path), "--paper"]) == 0
    text = (tmp_path / "table1.md").read_text()
    header = next(line for line in text.splitlines() if line.startswith("| Dataset"))
    columns = [c.strip() for c in header.strip("|").split("|")]
    assert columns.index("Crane 4-shot I-AUROC") == columns.index("Crane P-F1") + 1  # beside Crane's
    assert columns.index("Crane+ I-AUROC") == columns.index("Crane 4-shot P-F1") + 1
    assert "85.0 ± 7.1" in text and "80.0 ± 14.1" in text and "50.0 (93.8)" in text
    with open(tmp_path / "table1.csv", newline="") as f:
        row = next(csv.DictReader(f))
    assert float(row["crane_fewshot_4_image_auroc"]) == pytest.approx(85.0)
    assert float(row["crane_fewshot_4_image_auroc_std"]) == pytest.approx(7.0711, abs=1e-3)
