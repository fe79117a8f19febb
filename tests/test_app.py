"""``python -m crane app``: the page in headless Chromium, its ``predict`` API endpoint, its exported-graph path.

The model is a narrow synthetic CLIP (4 blocks) with a random prompt checkpoint at S = 56, on the
CPU. Reference numbers come from ``predict`` and ``calibrate`` run on the same files. The browser
is the system's Chromium (``apt-get install chromium``) driven by Playwright's Python package;
nothing is downloaded. Without Chromium the browser tests skip, except under CI (``CI=true``),
where they fail. Screenshots of the two tabs go to ``results/`` (git-ignored).
"""
from __future__ import annotations

import csv
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from tests.conftest import REPO

SIZE = 56
BATCH = 2
TARGET_FPR = 0.25
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def _need(module: str):
    """Import ``module`` (the ``app`` extra), or skip (fail under CI)."""
    try:
        return __import__(module)
    except ImportError:
        if IN_CI:
            pytest.fail(f"{module} is not installed (pip install -e '.[app]')")
        pytest.skip(f"{module} is not installed (pip install -e '.[app]')")


def _chromium() -> str:
    """The system's Chromium, or skip (fail under CI)."""
    found = os.environ.get("CRANE_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    if not found:
        message = "no chromium executable (apt-get install chromium; .ci/run installs it)"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)
    return found


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


# -------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def setup(tmp_path_factory, detectors):
    """Weights, a checkpoint with ``calibrate``'s thresholds.json beside it, photographs (16-bit PNG, EXIF-turned
    JPEG, a truncated file), normal images (folder and zip), and ``predict``'s run on the photographs."""
    import torch

    from crane.cli import dispatch as cli
    from crane.models.synthetic import synthetic_clip_state_dict

    root = tmp_path_factory.mktemp("app")
    clip = root / "clip.pt"
    torch.save(synthetic_clip_state_dict(vision_width=128, vision_layers=4, seed=1), clip)
    checkpoint = root / "run" / "epoch_1.pth"
    assert cli.main(["init-checkpoint", str(checkpoint), "--clip_weights", str(clip)]) == 0
    flags = ["--clip_weights", str(clip), "--features_list", "2", "4", "--dino_model", "none", "--image_size",
             str(SIZE), "--device", "cpu", "--batch_size", str(BATCH)]

    rng = np.random.default_rng(0)
    photos = root / "photos"
    photos.mkdir()
    texture = cv2.resize(rng.integers(0, 256, (12, 16, 3), dtype=np.uint8), (96, 72), interpolation=cv2.INTER_CUBIC)
    cv2.imwrite(str(photos / "a16.png"), texture.astype(np.uint16) * 257)  # 16-bit
    exif = Image.Exif()
    exif[0x0112] = 6  # shown turned by 90 degrees
    Image.fromarray(rng.integers(0, 256, (64, 80, 3), dtype=np.uint8)).save(photos / "b.jpg", exif=exif, quality=92)
    data = (photos / "a16.png").read_bytes()
    (photos / "broken.png").write_bytes(data[:len(data) // 3])
    normal = root / "normal"
    normal.mkdir()
    for i in range(7):
        base = rng.integers(90, 160, (64, 64, 3), dtype=np.uint8)
        Image.fromarray(base + rng.integers(0, 20, (64, 64, 3), dtype=np.uint8)).save(normal / f"n{i}.png")
    archive = root / "normal.zip"
    with zipfile.ZipFile(archive, "w") as z:
        for path in sorted(normal.iterdir()):
            z.write(path, f"normal/{path.name}")

    assert cli.main(["calibrate", "--normal", str(normal), "--target_fpr", str(TARGET_FPR), "--checkpoint",
                     str(checkpoint), *flags]) == 0
    reference = json.loads((checkpoint.parent / "thresholds.json").read_text())
    files = [photos / "a16.png", photos / "b.jpg", photos / "broken.png"]
    predicted = root / "predicted"
    assert cli.main(["predict", *map(str, files), "--out", str(predicted), "--checkpoint", str(checkpoint), *flags,
                     "--save_maps", "--save_masks"]) == cli.EXIT_SKIPPED
    return dict(root=root, clip=clip, checkpoint=checkpoint, flags=flags, photos=photos, files=files, normal=normal,
                archive=archive, calibrated=reference, predicted=predicted)


@pytest.fixture(scope="module")
def few_shot(setup):
    """``calibrate --normal --reference_memory`` on the normal images (into its own folder): its thresholds.json
    and reference.pt."""
    from crane.cli import dispatch as cli

    output = setup["root"] / "few_shot" / "thresholds.json"
    assert cli.main(["calibrate", "--normal", str(setup["normal"]), "--target_fpr", str(TARGET_FPR),
                     "--reference_memory", "--output", str(output), "--checkpoint", str(setup["checkpoint"]),
                     *setup["flags"]]) == 0
    return dict(thresholds=json.loads(output.read_text()), memory=output.parent / "reference.pt")


@pytest.fixture(scope="module")
def app(setup):
    """The app of the checkpoint, served from this process (so its model calls can be counted)."""
    _need("gradio")
    from crane.cli.app import command
    from crane.cli.app.backend import Engine, check_flags

    port = _free_port()
    args = command.build_parser().parse_args(["--checkpoint", str(setup["checkpoint"]), *setup["flags"], "--port",
                                              str(port), "--max_file_size", "1"])
    assert check_flags(args) == []
    with pytest.MonkeyPatch.context() as mp:
        for name in ("GRADIO_TEMP_DIR", "GRADIO_EXAMPLES_CACHE", "GRADIO_ANALYTICS_ENABLED"):
            mp.setenv(name, os.environ.get(name, ""))  # restored afterwards
        workdir = command._workdir()
        engine = Engine.open(args)
        from crane.cli.app.page import build_page

        demo = build_page(engine, workdir)
        command.launch(demo, args, block=False)
        try:
            yield dict(url=f"http://127.0.0.1:{port}", engine=engine, workdir=workdir)
        finally:
            demo.close()
            shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture(scope="module")
def browser():
    _need("playwright")
    executable = _chromium()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=executable, headless=True)
        yield chromium
        chromium.close()


# ----------------------------------------------------------------------------- the page


def _table(page, selector: str) -> list[list[str]]:
    """The rows of a Dataframe (its rendered rows, not the hidden row it measures widths with)."""
    return page.eval_on_selector_all(f"{selector} [role=row][data-index]", "rows => rows.map(r => Array.from("
                                     "r.querySelectorAll('[role=gridcell]')).map(c => c.innerText.trim()))")


def _wait(page, script: str, timeout: float = 60_000) -> None:
    page.wait_for_function(script, timeout=timeout)


def test_inspect_calibrate_and_download_in_the_browser(setup, few_shot, app, browser):
    engine = app["engine"]
    expected = {Path(r["path"]).name: r for r in _rows(setup["predicted"] / "scores.csv")}
    calibrated = setup["calibrated"]
    page = browser.new_page(viewport={"width": 1280, "height": 1000})
    page.goto(app["url"], wait_until="load")
    page.wait_for_selector("#inspect-files input[type=file]", state="attached")
    header = page.locator("#header").inner_text()
    assert f"image {calibrated['image_threshold']:.6g}" in header  # thresholds.json beside the model, preloaded

    # upload two images and a truncated file: two panels, two scores, one listed failure
    calls = engine.model_calls
    page.locator("#inspect-files input[type=file]").set_input_files([str(f) for f in setup["files"]])
    _wait(page, "document.querySelectorAll('#panels img').length == 2 && "
                "document.querySelectorAll('#skipped [role=row][data-index]').length == 1")
    _wait(page, "document.querySelector('#inspect-status').innerText.includes('2 images scored')")
    rows = _table(page, "#scores")
    assert [r[0] for r in rows] == ["a16.png", "b.jpg"]
    for name, score, decided in rows:
        assert abs(float(score) - float(expected[name]["score"])) <= 1e-5
        assert decided == expected[name]["decision"]
    (skipped,) = _table(page, "#skipped")
    assert skipped[0] == "broken.png" and "truncated" in skipped[1] and str(app["workdir"]) not in skipped[1]
    assert engine.model_calls == calls + 1  # one batch of two readable images
    shots = REPO / "results"
    shots.mkdir(exist_ok=True)
    page.screenshot(path=str(shots / "app_inspect.png"), full_page=True)

    # the zip holds the files predict --out writes (same thresholds: those loaded at start)
    page.locator("#make-zip").click()
    link = page.locator("#results-zip a[download]").first
    link.wait_for(timeout=60_000)
    with page.expect_download() as download:
        link.click()
    got = zipfile.ZipFile(io.BytesIO(Path(download.value.path()).read_bytes()))
    reference = setup["predicted"]
    files = sorted(p.relative_to(reference).as_posix() for p in reference.rglob("*") if p.is_file())
    assert sorted(name for name in got.namelist() if not name.endswith("/")) == files
    zipped = [dict(r) for r in csv.DictReader(io.TextIOWrapper(got.open("scores.csv"), encoding="utf-8"))]
    assert [r["path"] for r in zipped] == ["a16.png", "b.jpg"]
    for row in zipped:
        assert abs(float(row["score"]) - float(expected[row["path"]]["score"])) <= 1e-5
        assert row["decision"] == expected[row["path"]]["decision"]
    assert [r["path"] for r in csv.DictReader(io.TextIOWrapper(got.open("skipped.csv"), encoding="utf-8"))] == \
        ["broken.png"]
    for name in files:
        if name.endswith(".npy"):
            np.testing.assert_allclose(np.load(io.BytesIO(got.read(name))), np.load(reference / name), rtol=0,
                                       atol=1e-5)
        elif name.endswith(".png"):
            a = cv2.imdecode(np.frombuffer(got.read(name), np.uint8), cv2.IMREAD_UNCHANGED)
            assert np.array_equal(a, cv2.imread(str(reference / name), cv2.IMREAD_UNCHANGED)), name

    # moving the image threshold between the two scores re-decides without a model call
    low, high = sorted(float(r[1]) for r in rows)
    middle = round((low + high) / 2, 6)
    assert low < middle <= high
    calls = engine.model_calls
    page.locator("#image-threshold input[type=range]").fill(str(middle))
    _wait(page, "Array.from(document.querySelectorAll('#scores [role=gridcell][data-col=\"2\"]')).map(c => "
                "c.innerText.trim()).sort().join() == 'anomalous,normal'")
    decided = {r[0]: r[2] for r in _table(page, "#scores")}
    assert decided == {r[0]: ("anomalous" if float(r[1]) >= middle else "normal") for r in rows}
    assert engine.model_calls == calls

    # calibrate from a zip of the normal images: calibrate --normal's thresholds, saved beside the model
    page.get_by_role("tab", name="Calibrate").click()
    page.locator("#calibrate-files input[type=file]").set_input_files(str(setup["archive"]))
    page.locator("#target-fpr input").fill(str(TARGET_FPR))
    _wait(page, "document.querySelectorAll('#calibrate-files .file-preview tr, #calibrate-files tr').length >= 1")
    page.locator("#calibrate").click()
    _wait(page, "document.querySelector('#calibration-report').innerText.includes('expected false-alarm rate')")
    report = page.locator("#calibration-report").inner_text()
    interval = calibrated["calibration"]["image"]["expected_fpr_interval"]
    assert f"{100 * interval[0]:.3g}% to {100 * interval[1]:.3g}%" in report
    (setup["checkpoint"].parent / "thresholds.json").unlink()
    page.locator("#save-thresholds").click()
    _wait(page, "document.querySelector('#saved').innerText.includes('Wrote')")
    saved = json.loads((setup["checkpoint"].parent / "thresholds.json").read_text())
    assert (saved["image_threshold"], saved["pixel_threshold"]) == \
        (calibrated["image_threshold"], calibrated["pixel_threshold"])
    for key in ("image", "pixel"):
        assert saved["calibration"][key] == calibrated["calibration"][key]
    assert saved["model"] == calibrated["model"]

    # again with a reference memory built from the same images: calibrate --reference_memory's thresholds, and the
    # Inspect tab's image threshold moves to them
    page.locator("#reference-memory input[type=checkbox]").check()
    page.locator("#calibrate").click()
    _wait(page, "document.querySelector('#calibration-report').innerText.includes('leave-one-out')")
    memory = few_shot["thresholds"]
    report = page.locator("#calibration-report").inner_text()
    assert f"{memory['image_threshold']:.6g}" in report and f"{memory['pixel_threshold']:.6g}" in report
    _wait(page, f"Math.abs(Number(document.querySelector('#image-threshold input[type=number]').value) - "
                f"{memory['image_threshold']}) < 1e-6")
    page.screenshot(path=str(shots / "app_calibrate.png"), full_page=True)
    # and this page's Inspect tab scores with that memory: Detector.predict's scores with it
    page.get_by_role("tab", name="Inspect").click()
    page.locator("#inspect-files input[type=file]").set_input_files([str(f) for f in setup["files"][:2]])
    _wait(page, "document.querySelector('#inspect-status').innerText.includes('built in Calibrate')")
    from crane.data.image import load_rgb

    detector = engine.predictor.detector
    with engine._lock:  # the app's own model, between its calls
        detector.set_reference(few_shot["memory"])
        few_shot_scores = detector.predict([load_rgb(f, exif_orientation=True) for f in setup["files"][:2]]).scores
    assert abs(few_shot_scores[0] - float(expected["a16.png"]["score"])) > 1e-3  # not the zero-shot score
    for (name, score, _), expected_score in zip(_table(page, "#scores"), few_shot_scores):
        assert abs(float(score) - float(expected_score)) <= 1e-5, name
    page.close()


def test_api_endpoint_gives_predicts_numbers(setup, app, tmp_path):
    _need("gradio_client")
    from gradio_client import Client, handle_file

    expected = {Path(r["path"]).name: r for r in _rows(setup["predicted"] / "scores.csv")}
    image_t = setup["calibrated"]["image_threshold"]
    client = Client(app["url"], verbose=False)
    for name in ("a16.png", "b.jpg"):
        got = client.predict(handle_file(str(setup["photos"] / name)), api_name="/predict")
        assert set(got) == {"score", "decision", "map_shape"} and got["map_shape"] == [SIZE, SIZE]
        assert abs(got["score"] - float(expected[name]["score"])) <= 1e-5
        assert got["decision"] == expected[name]["decision"] == ("anomalous" if got["score"] >= image_t else "normal")
        for threshold, decided in ((0.0, "anomalous"), (1.0, "normal")):  # passed with the call
            assert client.predict(image=handle_file(str(setup["photos"] / name)), image_threshold=threshold,
                                  api_name="/predict")["decision"] == decided
    with pytest.raises(Exception, match="truncated"):
        client.predict(handle_file(str(setup["photos"] / "broken.png")), api_name="/predict")
    big = tmp_path / "big.png"  # over --max_file_size 1 (MB)
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (800, 700, 3), dtype=np.uint8)).save(big)
    assert big.stat().st_size > 1024 ** 2
    calls = app["engine"].model_calls
    with pytest.raises(Exception, match="(?i)size"):
        client.predict(handle_file(str(big)), api_name="/predict")
    assert app["engine"].model_calls == calls


def test_few_shot_calibration_is_calibrates_and_inspect_scores_with_its_memory(setup, few_shot, tmp_path):
    """Engine.calibrate with a reference memory: calibrate --reference_memory's thresholds on the same images, its
    reference.pt and "reference" entry when saved; the session's Inspect scores are Detector.predict's with that
    memory, the API's stay those of the model loaded at start."""
    import torch

    from crane.cli.app import command
    from crane.cli.app.backend import Engine, check_flags
    from crane.data.image import load_rgb
    from crane.errors import CraneError
    from crane.files import file_identity

    checkpoint = tmp_path / "run" / setup["checkpoint"].name  # a folder of its own: no thresholds.json yet
    checkpoint.parent.mkdir()
    shutil.copy(setup["checkpoint"], checkpoint)

    def opened() -> Engine:
        args = command.build_parser().parse_args(["--checkpoint", str(checkpoint), *setup["flags"]])
        assert check_flags(args) == []
        return Engine.open(args)

    engine = opened()
    folder = tmp_path / "upload"
    shutil.copytree(setup["normal"], folder / "normal")
    calibration = engine.calibrate(folder, TARGET_FPR, reference_memory=True)
    expected = few_shot["thresholds"]
    assert (calibration.thresholds.image, calibration.thresholds.pixel) == \
        (expected["image_threshold"], expected["pixel_threshold"])
    for key in ("image", "pixel"):
        assert calibration.thresholds.meta["calibration"][key] == expected["calibration"][key]
    assert calibration.memory.references == 7 and calibration.left_out == 7

    # saved: thresholds.json naming reference.pt beside it, calibrate's entry; the memory is calibrate's
    written = engine.save(calibration)
    assert written == [checkpoint.parent / "thresholds.json", checkpoint.parent / "reference.pt"]
    saved = json.loads(written[0].read_text())
    assert saved["reference"] == {**expected["reference"], "identity": file_identity(written[1])}
    ours, theirs = (torch.load(p, weights_only=True) for p in (written[1], few_shot["memory"]))
    assert ours["spec"] == theirs["spec"]
    for a, b in zip(ours["banks"], theirs["banks"]):
        assert torch.equal(a["features"], b["features"]) and torch.equal(a["indices"], b["indices"])

    # this session's Inspect scores with the memory: Detector.predict's with it (images turned by their EXIF tag)
    photos = setup["files"][:2]
    batch = engine.score(photos, setup["photos"], calibration.memory)
    assert "built in Calibrate" in batch.scored_with
    detector = engine.predictor.detector
    detector.set_reference(few_shot["memory"])
    reference = detector.predict([load_rgb(p, exif_orientation=True) for p in photos]).scores
    np.testing.assert_allclose([item.score for item in batch.scored], reference, rtol=0, atol=1e-6)
    # the API, and a session without a memory, keep the model loaded at start (zero-shot: predict's scores)
    zero_shot = {Path(r["path"]).name: float(r["score"]) for r in _rows(setup["predicted"] / "scores.csv")}
    assert abs(engine.predict_file(photos[0])["score"] - zero_shot["a16.png"]) <= 1e-5
    assert [round(item.score, 5) for item in engine.score(photos, setup["photos"]).scored] == \
        [round(zero_shot[p.name], 5) for p in photos]
    # started again, the app scores with the memory its thresholds.json names, and says so
    again = opened()
    assert again.notes[0].startswith(f"few-shot: scoring against reference memory {written[1]}")
    np.testing.assert_allclose([item.score for item in again.score(photos, setup["photos"]).scored], reference,
                               rtol=0, atol=1e-6)

    # one image, and a file in the way of reference.pt: one line each
    single = tmp_path / "single"
    single.mkdir()
    shutil.copy(next(setup["normal"].iterdir()), single)
    with pytest.raises(CraneError, match="needs at least 2 normal images"):
        engine.calibrate(single, TARGET_FPR, reference_memory=True)
    written[1].write_bytes(b"someone else's file")
    with pytest.raises(CraneError, match="exists and is not a reference memory"):
        engine.save(calibration)
    assert written[1].read_bytes() == b"someone else's file"


def test_no_server_file_is_readable_but_the_apps_own(setup, app):
    import urllib.error
    import urllib.request

    for path in (setup["checkpoint"], REPO / "pyproject.toml", Path("/etc/passwd"), setup["clip"]):
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(f"{app['url']}/gradio_api/file={path}")
        assert refused.value.code == 403, path
    # nor through the API, with a server path in place of an uploaded file (Gradio's two-step call)
    body = json.dumps({"data": [{"path": str(setup["photos"] / "a16.png"), "meta": {"_type": "gradio.FileData"}},
                                None]}).encode()
    request = urllib.request.Request(f"{app['url']}/gradio_api/call/predict", body,
                                     {"Content-Type": "application/json"})
    event = json.load(urllib.request.urlopen(request))["event_id"]
    answer = urllib.request.urlopen(f"{app['url']}/gradio_api/call/predict/{event}").read().decode()
    assert "event: error" in answer and "not uploaded by a user" in answer and "score" not in answer


# ----------------------------------------------------------------------- uploads, zip limits


def test_zip_members_outside_the_folder_too_many_or_too_large_are_refused(tmp_path):
    from crane.cli.app.uploads import UploadError, ZipLimits, stage

    def archive(name: str, members: dict[str, bytes]) -> Path:
        path = tmp_path / name
        with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
            for member, data in members.items():
                z.writestr(member, data)
        return path

    png = io.BytesIO()
    Image.new("RGB", (8, 8)).save(png, "PNG")
    good = archive("good.zip", {"parts/good/a.png": png.getvalue(), "parts/notes.txt": b"x", "__MACOSX/._a.png": b""})
    placed = stage([good], tmp_path / "ok")
    assert placed == [tmp_path / "ok" / "good"]
    assert [p.relative_to(placed[0]).as_posix() for p in placed[0].rglob("*") if p.is_file()] == ["parts/good/a.png"]
    for name, members, limits, message in [
            ("up.zip", {"../escape.png": png.getvalue()}, ZipLimits(), "outside its folder"),
            ("abs.zip", {"/tmp/abs.png": png.getvalue()}, ZipLimits(), "outside its folder"),
            ("many.zip", {f"{i}.png": png.getvalue() for i in range(5)}, ZipLimits(max_files=4), "more than 4 files"),
            ("big.zip", {"big.png": bytes(5000)}, ZipLimits(max_bytes=4096), "unpacks to more than")]:
        with pytest.raises(UploadError, match=message):
            stage([archive(name, members)], tmp_path / name.replace(".zip", ""), limits)
        assert not (tmp_path / name.replace(".zip", "")).exists()  # nothing of a refused upload is kept
    assert not (tmp_path.parent / "escape.png").exists()
    (tmp_path / "bad.zip").write_bytes(b"PK not a zip")
    with pytest.raises(UploadError, match="not a readable zip"):
        stage([tmp_path / "bad.zip"], tmp_path / "bad")


# ------------------------------------------------------------------------- exported graph


@pytest.fixture(scope="module")
def exported(setup):
    """The checkpoint exported to ONNX (with the calibrated thresholds in its metadata)."""
    from crane.cli import dispatch as cli

    path = setup["root"] / "graph" / "crane.onnx"
    flags = setup["flags"][:-4]  # no --device / --batch_size
    assert cli.main(["export", "--checkpoint", str(setup["checkpoint"]), "--out", str(path), *flags,
                     "--no_check"]) == 0  # the tests compare its numbers with predict's
    return path


def test_exported_graph_calibrates_with_calibrates_arithmetic(setup, exported):
    from crane.cli.app import command
    from crane.cli.app.backend import CraneError, Engine, check_flags

    def opened() -> Engine:
        args = command.build_parser().parse_args(["--model", str(exported), "--batch_size", str(BATCH)])
        assert check_flags(args) == []
        return Engine.open(args)

    engine = opened()
    assert engine.notes[0].startswith(f"thresholds: from the metadata of {exported}")
    with pytest.raises(CraneError, match="exported graph scores with the reference memory exported into it"):
        engine.calibrate(setup["normal"], TARGET_FPR, reference_memory=True)
    folder = setup["root"] / "graph_calibration"
    shutil.copytree(setup["normal"], folder)
    calibration = engine.calibrate(folder, TARGET_FPR)
    calibrated = setup["calibrated"]
    assert calibration.thresholds.image == pytest.approx(calibrated["image_threshold"], abs=1e-5)
    assert calibration.thresholds.pixel == pytest.approx(calibrated["pixel_threshold"], abs=1e-5)
    image = calibration.thresholds.meta["calibration"]["image"]
    assert {k: image[k] for k in ("normal_images", "flagged", "expected_fpr", "expected_fpr_interval")} == \
        {k: calibrated["calibration"]["image"][k] for k in ("normal_images", "flagged", "expected_fpr",
                                                            "expected_fpr_interval")}
    assert calibration.thresholds.meta["model"]["checkpoint_sha256"] == calibrated["model"]["checkpoint_sha256"]
    assert engine.save(calibration) == [exported.parent / "thresholds.json"]
    assert opened().notes[0] == (f"thresholds: from {exported.parent / 'thresholds.json'} (beside the "
                                          "exported model, instead of the thresholds in its metadata)")
    (exported.parent / "thresholds.json").unlink()


def test_predict_backend_prefers_the_thresholds_beside_the_graph_and_says_so(setup, exported, tmp_path, capsys):
    from crane.cli import dispatch as cli
    from crane.inspection.thresholds import Thresholds, load_thresholds, save_thresholds

    photo = str(setup["photos"] / "a16.png")
    beside = exported.parent / "thresholds.json"
    calibrated = load_thresholds(setup["checkpoint"].parent / "thresholds.json")
    try:
        save_thresholds(Thresholds(1.0, 0.99, {"model": calibrated.meta["model"]}), beside)
        assert cli.main(["predict", photo, "--out", str(tmp_path / "a"), "--backend", "onnxruntime", "--model",
                         str(exported)]) == 0
        assert f"thresholds: from {beside} (beside the exported model, instead of the thresholds in its metadata)" \
            in capsys.readouterr().err
        assert [r["decision"] for r in _rows(tmp_path / "a" / "scores.csv")] == ["normal"]
        other = {**calibrated.meta["model"], "checkpoint_sha256": "0" * 64}
        save_thresholds(Thresholds(1.0, 0.99, {"model": other}), beside)
        assert cli.main(["predict", photo, "--out", str(tmp_path / "b"), "--backend", "onnxruntime", "--model",
                         str(exported)]) == cli.EXIT_USAGE
        assert "was calibrated for other scores" in capsys.readouterr().err
    finally:
        beside.unlink(missing_ok=True)
    assert cli.main(["predict", photo, "--out", str(tmp_path / "c"), "--backend", "onnxruntime", "--model",
                     str(exported)]) == 0
    assert f"thresholds: from the metadata of {exported}" in capsys.readouterr().err


def test_command_line_app_of_an_exported_graph_without_torch(setup, exported, tmp_path):
    """``python -m crane app --model`` in a process where torch cannot be imported: it binds 127.0.0.1, serves
    the API with the thresholds beside the graph, and removes its working folder at exit (SIGTERM)."""
    _need("gradio_client")
    from gradio_client import Client, handle_file

    from crane.inspection.thresholds import Thresholds, load_thresholds, save_thresholds

    calibrated = load_thresholds(setup["checkpoint"].parent / "thresholds.json")
    beside = exported.parent / "thresholds.json"
    save_thresholds(Thresholds(1.0, 0.99, {"model": calibrated.meta["model"]}), beside)
    port = _free_port()
    log = tmp_path / "app.log"
    code = "import sys; sys.modules['torch'] = None; from crane.cli import main; sys.exit(main(sys.argv[1:]))"
    with open(log, "w") as out:
        process = subprocess.Popen([sys.executable, "-c", code, "app", "--model", str(exported), "--port", str(port)],
                                   cwd=REPO, stdout=out, stderr=subprocess.STDOUT,
                                   env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.monotonic() + 120
        while f"http://127.0.0.1:{port}" not in log.read_text() and process.poll() is None:
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.3)
        text = log.read_text()
        assert process.poll() is None, text[-3000:]
        assert f"thresholds: from {beside} (beside the exported model, instead of the thresholds in its metadata)" \
            in text
        workdir = Path(text.split("removed at exit): ", 1)[1].split("\n", 1)[0])
        assert workdir.is_dir()
        with pytest.raises(ConnectionRefusedError):  # bound to 127.0.0.1 only
            socket.create_connection(("127.0.0.2", port), timeout=5).close()
        got = Client(f"http://127.0.0.1:{port}", verbose=False).predict(handle_file(str(setup["photos"] / "a16.png")),
                                                                         api_name="/predict")
        reference = {Path(r["path"]).name: float(r["score"]) for r in _rows(setup["predicted"] / "scores.csv")}
        assert abs(got["score"] - reference["a16.png"]) <= 1e-5 and got["decision"] == "normal"  # beside: 1.0
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 0, log.read_text()[-3000:]
        assert not workdir.exists()
    finally:
        beside.unlink(missing_ok=True)
        if process.poll() is None:
            process.kill()
            process.wait()


def test_flag_errors_and_the_no_login_note(tmp_path, capsys):
    _need("gradio")
    from crane.cli import dispatch as cli

    assert cli.main(["app", "--host", "0.0.0.0", "--model", str(tmp_path / "missing.onnx")]) == cli.EXIT_USAGE
    err = capsys.readouterr().err
    assert "note: --host 0.0.0.0: the page has no login" in err
    assert "error: exported model not found" in err
    assert cli.main(["app", "--port", "70000", "--batch_size", "0", "--model", "x.onnx"]) == cli.EXIT_USAGE
    err = capsys.readouterr().err
    assert "--port must be in 0..65535" in err and "--batch_size must be at least 1" in err
