"""``test.sh`` and ``reproduce.sh`` run the published scripts' commands (checked with ``DRY_RUN=1``).

The published test.sh (Table 1 from the official checkpoints) and reproduce.sh (train, then test)
run a fixed sequence of test.py / train.py commands; ours must run the same sequence with the same
checkpoint, epoch, soft_mean, features_list and dino_model per dataset, Crane+ with the published
batch-wide D-Attn mean over the published batches.
"""
from __future__ import annotations

import ast
import importlib.util
import os
import shlex
import subprocess
from pathlib import Path

import pytest

from tests.conftest import REPO

DATASETS = ("mvtec", "visa", "mpdd", "btad", "sdd", "dagm", "dtd", "headct", "brainmri", "br35h", "isic",
            "cvc-colondb", "cvc-clinicdb", "tn3k")
MEDICAL = ("brainmri", "headct", "br35h", "isic", "tn3k", "cvc-colondb", "cvc-clinicdb")  # published order
CRANE_ORDER = ("mvtec", "visa", "mpdd", "sdd", "btad", "dtd", "dagm", *MEDICAL)
CRANEP_ORDER = ("mvtec", "visa", "mpdd", "sdd", "btad", "dtd", "dagm", *MEDICAL)


def _test_parser():
    spec = importlib.util.spec_from_file_location("crane_test_script_for_scripts", REPO / "test.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.build_parser()


def _dry_run(tmp_path: Path, script: str, *args: str) -> list[list[str]]:
    """The commands ``script`` would run (each as argv), with every dataset present (empty meta.json)."""
    root = tmp_path / "data"
    for ds in DATASETS:
        (root / ds).mkdir(parents=True, exist_ok=True)
        (root / ds / "meta.json").write_text("{}")
    env = {**os.environ, "DRY_RUN": "1", "CRANE_DATASETS": str(root), "CLIP_WEIGHTS": "synthetic",
           "PYTHON": str(REPO / ".venv" / "bin" / "python") if (REPO / ".venv").is_dir() else "python3"}
    proc = subprocess.run(["bash", str(REPO / script), *args], capture_output=True, text=True, env=env, timeout=120,
                          cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    return [shlex.split(line)[1:] for line in proc.stdout.splitlines() if line.split()[1:2] in (["test.py"], ["train.py"])]


def _flags(argv: list[str]) -> dict[str, list[str]]:
    """``--flag value ...`` tokens grouped by flag."""
    out: dict[str, list[str]] = {}
    flag = None
    for token in argv:
        if token.startswith("--"):
            flag = token
            out[flag] = []
        elif flag is not None:
            out[flag].append(token)
    return out


def _tests(commands: list[list[str]]) -> list:
    """The parsed test.py commands; model flags not given take test.py's defaults (the official Crane+
    checkpoints record no soft_mean, so the default is what runs)."""
    from crane.engine.evaluate import EvalOptions

    parser = _test_parser()
    defaults = EvalOptions()
    parsed = [parser.parse_args(c[1:]) for c in commands if c[0] == "test.py"]
    for args in parsed:
        for key in ("dino_model", "features_list", "soft_mean", "attn_type"):
            if not hasattr(args, key):
                setattr(args, key, getattr(defaults, key))
    return parsed


def test_test_sh_runs_the_published_test_sh(tmp_path):
    runs = _tests(_dry_run(tmp_path, "test.sh", "cpu"))
    crane, cranep = runs[:14], runs[14:]
    assert len(runs) == 28
    assert tuple(a.dataset for a in crane) == CRANE_ORDER and tuple(a.dataset for a in cranep) == CRANEP_ORDER
    for a in crane:
        source = "visa" if a.dataset == "mvtec" else "mvtec"
        assert (a.model_name, a.epoch, a.dino_model, a.features_list, a.soft_mean) == \
            (f"trained_on_{source}_crane", 5, "none", [6, 12, 18, 24], True), a.dataset
        assert a.checkpoint == f"checkpoints/trained_on_{source}_crane/epoch_5.pth"
        assert a.device == "cpu" and not a.visualize
    for a in cranep:
        source = "visa" if a.dataset == "mvtec" else "mvtec"  # DAGM too: the MVTec-trained Crane+
        epoch, soft = (1, True) if a.dataset in MEDICAL else (5, a.dataset == "dagm")
        assert (a.model_name, a.epoch, a.dino_model, a.features_list, a.soft_mean) == \
            (f"trained_on_{source}_cranep", epoch, "dinov2", [24], soft), a.dataset
        assert a.dattn_batch_mean and a.dino_weights == "synthetic"
    assert all(a.image_size == 518 and a.sigma == 4 and a.aupro_method == "crane" for a in runs)


def test_test_sh_runs_only_the_datasets_named_and_checks_them_first(tmp_path):
    runs = _tests(_dry_run(tmp_path, "test.sh", "0,1", "dagm", "isic"))
    assert [(a.dataset, a.model_name) for a in runs] == [
        ("dagm", "trained_on_mvtec_crane"), ("isic", "trained_on_mvtec_crane"),
        ("dagm", "trained_on_mvtec_cranep"), ("isic", "trained_on_mvtec_cranep")]
    assert all(a.devices == [0, 1] and a.device == "cuda" for a in runs)
    env = {**os.environ, "CRANE_DATASETS": str(tmp_path / "nothing"), "CLIP_WEIGHTS": "synthetic"}
    proc = subprocess.run(["bash", str(REPO / "test.sh"), "cpu", "mpdd"], capture_output=True, text=True, env=env,
                          timeout=60)
    assert proc.returncode == 2 and "mpdd/meta.json" in proc.stderr and "test.py" not in proc.stdout
    proc = subprocess.run(["bash", str(REPO / "test.sh"), "cpu", "nosuchset"], capture_output=True, text=True,
                          env=env, timeout=60)
    assert proc.returncode == 2 and "unknown dataset 'nosuchset'" in proc.stderr


def test_reproduce_sh_runs_the_published_reproduce_sh(tmp_path):
    commands = _dry_run(tmp_path, "reproduce.sh", "myrun", "0")
    kinds = [c[0] for c in commands]
    assert kinds == ["train.py"] * 2 + ["test.py"] * 14 + ["train.py"] * 2 + ["test.py"] * 14
    trains = [c for c in commands if c[0] == "train.py"]
    for c, (dataset, name) in zip(trains, [("mvtec", "myrun_crane"), ("visa", "myrun_crane"),
                                           ("mvtec", "myrun_cranep"), ("visa", "myrun_cranep")]):
        opts = _flags(c[1:])
        assert (opts["--model_name"], opts["--dataset"], opts["--device"]) == ([name], [dataset], ["0"])
        if name.endswith("_crane"):
            assert opts["--dino_model"] == ["none"] and opts["--features_list"] == ["6", "12", "18", "24"]
        else:  # Crane+: default dino_model (dinov2), the published batch-wide D-Attn mean in training
            assert "--dino_model" not in opts and opts["--dattn_batch_mean"] == ["True"]
            assert opts["--features_list"] == ["24"]
        assert opts["--resume"] == [] and opts["--seed"] == ["111"] and opts["--why"] == ["Evaluation purpose"]
    runs = _tests(commands)
    crane, cranep = runs[:14], runs[14:]
    assert tuple(a.dataset for a in crane) == CRANE_ORDER and tuple(a.dataset for a in cranep) == CRANEP_ORDER
    for a in crane:
        source = "visa" if a.dataset == "mvtec" else "mvtec"
        assert (a.model_name, a.epoch, a.soft_mean, a.dino_model) == (f"trained_on_{source}_myrun_crane", 5, True, "none")
    for a in cranep:  # published reproduce.sh: soft_mean True everywhere, DAGM with the VisA-trained Crane+
        source = "visa" if a.dataset in ("mvtec", "dagm") else "mvtec"
        epoch = 1 if a.dataset in MEDICAL else 5
        assert (a.model_name, a.epoch, a.soft_mean, a.dino_model, a.dattn_batch_mean) == \
            (f"trained_on_{source}_myrun_cranep", epoch, True, "dinov2", True), a.dataset


@pytest.mark.parametrize("script,args", [("test.sh", []), ("reproduce.sh", ["x"]), ("test.sh", ["gpu"])])
def test_scripts_reject_bad_arguments_with_one_message(script, args):
    proc = subprocess.run(["bash", str(REPO / script), *args], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and proc.stderr.strip() and proc.stdout == ""


@pytest.mark.parametrize("script,args", [("test.sh", ["--help"]), ("test.sh", ["-h"]), ("reproduce.sh", ["--help"]),
                                         ("reproduce.sh", ["myrun", "cpu", "--help"])])
def test_scripts_print_their_help_and_run_nothing(script, args, tmp_path):
    env = {**os.environ, "DRY_RUN": "1", "CRANE_DATASETS": str(tmp_path / "nothing"), "PYTHON": "/nonexistent"}
    proc = subprocess.run(["bash", str(REPO / script), *args], capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode == 0 and proc.stderr == ""
    assert f"bash {script} " in proc.stdout and "DEVICE" in proc.stdout and "DATASET" in proc.stdout
    assert "==>" not in proc.stdout and ".py" not in proc.stdout.split("DEVICE")[0]  # the usage text, no command


@pytest.mark.parametrize("datasets,trained", [
    (["mpdd"], [("mvtec", "crane"), ("mvtec", "cranep")]),
    (["mvtec"], [("visa", "crane"), ("visa", "cranep")]),
    (["dagm"], [("mvtec", "crane"), ("visa", "cranep")]),  # published: DAGM with the VisA-trained Crane+
    (["mvtec", "isic"], [("mvtec", "crane"), ("visa", "crane"), ("mvtec", "cranep"), ("visa", "cranep")]),
])
def test_reproduce_sh_trains_only_the_models_its_evaluations_use(datasets, trained, tmp_path):
    commands = _dry_run(tmp_path, "reproduce.sh", "myrun", "cpu", *datasets)
    trains = [_flags(c[1:]) for c in commands if c[0] == "train.py"]
    assert [(t["--dataset"][0], t["--model_name"][0].split("_")[-1]) for t in trains] == trained
    used = {a.model_name for a in _tests(commands)}
    assert used == {f"trained_on_{d}_myrun_{m}" for d, m in trained}
    assert {a.dataset for a in _tests(commands)} == set(datasets)


def _option_groups(path: Path) -> list[list[str]]:
    """The option strings of every ``add_argument`` call in a script, read from its source (nothing imported)."""
    groups = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "add_argument":
            names = [a.value for a in node.args if isinstance(a, ast.Constant) and str(a.value).startswith("--")]
            if names:
                groups.append(names)
    return groups


@pytest.mark.parametrize("script", ["scripts/bench_export.py", "scripts/bench_metrics.py", "scripts/bench_predict.py",
                                    "scripts/bench_throughput.py", "scripts/precision_drift.py",
                                    "datasets/synthetic.py", "datasets/generate.py"])
def test_bench_and_dataset_scripts_take_both_spellings_of_their_flags(script):
    """Underscores first, as the entry points spell their flags; the hyphen spelling is accepted too."""
    groups = _option_groups(REPO / script)
    assert groups, script
    for names in groups:
        for name in names:
            if "_" in name[2:] or "-" in name[2:]:
                assert names[0] == "--" + name[2:].replace("-", "_"), names  # the canonical spelling first
                assert "--" + name[2:].replace("_", "-") in names, names


def test_dataset_tools_take_both_spellings(tmp_path, capsys):
    from datasets.generate import main as generate_main
    from datasets.synthetic import main as synthetic_main

    for spelling, folder in (("_", "a"), ("-", "b")):
        args = [str(tmp_path / folder), "--classes", "1", "--train", "0", f"--test{spelling}normal", "1",
                f"--test{spelling}anomalous", "1", "--size", "16"]
        assert synthetic_main(args) == 0
        missing_csv = str(tmp_path / "none.csv")
        assert generate_main(["custom", str(tmp_path / folder), f"--split{spelling}csv", missing_csv]) == 2
        assert "--split_csv: file not found" in capsys.readouterr().err
