"""Make ``docs/app.png``: the Inspect tab of ``python -m crane app`` on synthetic data, with RANDOM weights.

    python scripts/app_screenshot.py [--out docs/app.png] [--chromium /usr/bin/chromium]

The model is ``--clip_weights synthetic`` with a random prompt checkpoint (``init-checkpoint``), so
the page shows its "random weights: the numbers are meaningless" banner; the images come from
``datasets.synthetic`` (textures with painted defects). Thresholds are calibrated first with
``python -m crane calibrate --normal`` on the class's normal images, so the page opens with them.
Needs the app extra (``pip install -e '.[app]'``) and the system's Chromium; downloads nothing.
"""
from __future__ import annotations

import argparse
import shutil
import socket
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

FLAGS = ["--clip_weights", "synthetic", "--dino_model", "none", "--image_size", "112", "--device", "cpu"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "app.png",
                        help="PNG to write (default: docs/app.png)")
    parser.add_argument("--chromium", default=shutil.which("chromium") or shutil.which("chromium-browser"),
                        help="Chromium executable (default: chromium on the PATH)")
    args = parser.parse_args(argv)
    if not args.chromium:
        parser.error("no Chromium found: apt-get install chromium, or pass --chromium PATH")

    from playwright.sync_api import sync_playwright

    from crane import cli
    from crane.cli.app import command
    from datasets.synthetic import make_synthetic_dataset

    with tempfile.TemporaryDirectory(prefix="crane-app-shot-") as tmp:
        root = Path(tmp)
        data = make_synthetic_dataset(root / "demo", classes=1, train=0, test_normal=12, test_anomalous=3, size=160)
        (cls,) = [p for p in (data / "test").iterdir() if p.is_dir()]
        checkpoint = root / "run" / "epoch_1.pth"
        assert cli.main(["init-checkpoint", str(checkpoint)]) == 0
        assert cli.main(["calibrate", "--normal", str(cls / "good"), "--target_fpr", "0.1", "--checkpoint",
                         str(checkpoint), *FLAGS]) == 0
        photos = sorted(p for p in cls.rglob("*.png") if p.parent.name not in ("good", "masks"))[:2]
        photos.append(sorted((cls / "good").iterdir())[0])

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        options = command.build_parser().parse_args(["--checkpoint", str(checkpoint), *FLAGS, "--port", str(port)])
        from crane.cli.app.backend import Engine, check_flags

        assert not check_flags(options)
        workdir = command._workdir()
        try:
            from crane.cli.app.page import build_page

            demo = build_page(Engine.open(options), workdir)
            command.launch(demo, options, block=False)
            with sync_playwright() as p:
                browser = p.chromium.launch(executable_path=args.chromium, headless=True)
                page = browser.new_page(viewport={"width": 1280, "height": 900})
                page.goto(f"http://127.0.0.1:{port}", wait_until="load")
                page.locator("#inspect-files input[type=file]").set_input_files([str(f) for f in photos])
                page.wait_for_function("document.querySelectorAll('#panels img').length == 3", timeout=120_000)
                page.wait_for_function("Array.from(document.querySelectorAll('#panels img')).every(i => i.complete)")
                args.out.parent.mkdir(parents=True, exist_ok=True)
                page.screenshot(path=str(args.out), full_page=True)
                browser.close()
            demo.close()
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
    print(f"wrote {args.out} (random weights: the numbers on it are meaningless)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
