"""What reading did to unusual inputs, said once per run: 12-bit data in 16-bit files (``--bit_depth``),
multi-page TIFFs read on their first page, images upscaled to the model input."""
from __future__ import annotations

import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from crane.cli import dispatch as cli
from crane.data.image import InputNotes, load_rgb
from tests.conftest import CLI_IMAGE_SIZE as SIZE
from tests.conftest import REPO


def _twelve_bit(path, seed: int = 0) -> np.ndarray:
    """A 12-bit ramp with noise (values 0..4095) saved as a 16-bit grayscale PNG; returns the values."""
    values = (np.random.default_rng(seed).random((64, 72)) * 4095).astype(np.uint16)
    Image.fromarray(values).save(path)
    return values


def _pages(path, count: int) -> None:
    pages = [Image.fromarray(np.full((64, 64, 3), 40 * (i + 1), np.uint8)) for i in range(count)]
    pages[0].save(path, save_all=True, append_images=pages[1:])


def test_twelve_bit_data_is_noted_and_read_at_its_depth(tmp_path):
    values = _twelve_bit(tmp_path / "cam.png")
    notes = InputNotes()
    default = load_rgb(tmp_path / "cam.png", notes=notes)
    assert np.array_equal(default[..., 0], (values >> 8).astype(np.uint8)) and default.max() <= 15  # as today
    (line,) = notes.lines()
    assert line.startswith("1 16-bit image(s) use at most 12 bits") and "cam.png" in line and "--bit_depth 12" in line
    deep = load_rgb(tmp_path / "cam.png", bit_depth=12, notes=(quiet := InputNotes()))
    assert np.array_equal(deep[..., 0], (values >> 4).astype(np.uint8)) and deep.max() > 200
    assert quiet.lines() == []
    full = (np.random.default_rng(1).random((8, 8)) * 65535).astype(np.uint16)  # real 16-bit data: no note
    assert load_rgb(full, notes=(none := InputNotes())).max() > 200 and none.lines() == []
    clipped = InputNotes()
    assert load_rgb(full, bit_depth=12, notes=clipped).max() == 255
    assert "above 12 bits" in clipped.lines()[0] and "--bit_depth" in clipped.lines()[0]
    with pytest.raises(ValueError, match="bit_depth"):
        load_rgb(full, bit_depth=20)


def test_multi_page_files_and_small_images_are_counted_once_each(tmp_path):
    _pages(tmp_path / "stack.tif", 3)
    notes = InputNotes()
    for _ in range(2):
        assert np.all(load_rgb(tmp_path / "stack.tif", notes=notes) == 40)  # the first page
    notes.check_size(20, 600, 56, "wide.png")
    notes.check_size(56, 56, 56, "fits.png")
    lines = notes.lines()
    assert lines == ["2 multi-page file(s) read on their first page only, e.g. " f"{tmp_path / 'stack.tif'} (3 pages)",
                     "1 image(s) smaller than the model input (56 x 56) were upscaled to it, e.g. wide.png (600 x 20)"]


def test_reading_stays_torch_free(tmp_path):
    _twelve_bit(tmp_path / "cam.png")
    code = ("import sys; from crane.data.image import InputNotes, load_rgb; n = InputNotes(); "
            f"load_rgb({str(tmp_path / 'cam.png')!r}, notes=n); print(len(n.lines()), 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True,
                         timeout=120).stdout.split()
    assert out == ["1", "False"]


def test_predict_and_calibrate_say_what_was_done_once_per_run(tmp_path, model_flags, official_checkpoint, detectors,
                                                               capsys):
    folder = tmp_path / "photos"
    folder.mkdir()
    for i in range(2):
        _twelve_bit(folder / f"cam{i}.png", seed=i)
    _pages(folder / "stack.tif", 2)
    Image.fromarray(np.full((SIZE // 2, SIZE, 3), 90, np.uint8)).save(folder / "small.png")
    Image.fromarray(np.full((SIZE, SIZE, 3), 90, np.uint8)).save(folder / "fits.png")
    checkpoint = tmp_path / "ckpt" / "epoch_5.pth"
    checkpoint.parent.mkdir()
    shutil.copy(official_checkpoint, checkpoint)
    base = ["--checkpoint", str(checkpoint), *model_flags]

    assert cli.main(["predict", str(folder), "--out", str(tmp_path / "out"), *base, "--no_panels"]) == 0
    err = capsys.readouterr().err.splitlines()
    notes = [line for line in err if line.startswith("note: ") and "thresholds" not in line]
    assert len(notes) == 3, notes
    assert notes[0].startswith("note: 2 16-bit image(s) use at most 12 bits") and "--bit_depth 12" in notes[0]
    assert notes[1].startswith("note: 1 multi-page file(s) read on their first page only") and "(2 pages)" in notes[1]
    assert notes[2].startswith(f"note: 1 image(s) smaller than the model input ({SIZE} x {SIZE})")
    assert notes[2].endswith(f"small.png ({SIZE} x {SIZE // 2})")

    assert cli.main(["calibrate", "--normal", str(folder), "--target_fpr", "0.2", "--bit_depth", "12", *base]) == 0
    err = capsys.readouterr().err
    assert "use at most 12 bits" not in err and "read on their first page only" in err
    saved = (checkpoint.parent / "thresholds.json").read_text()
    assert '"bit_depth": 12' in saved
    assert cli.main(["predict", str(folder), "--out", str(tmp_path / "again"), *base, "--no_panels"]) == 0
    assert "calibrated on images read with --bit_depth 12" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["predict", str(folder), "--out", str(tmp_path / "x"), *base, "--bit_depth", "7"])
