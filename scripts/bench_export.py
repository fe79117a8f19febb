"""Milliseconds per image of the exported graph against torch, at ViT-L/14 widths (random weights).

One run builds a Crane+ model (``--model crane`` for Crane) with random CLIP ViT-L/14 vision
widths (1024 x 24 blocks, ``crane.models.synthetic``) and a random DINOv2 ViT-B/14-reg4, exports
it once (``crane.export``, ONNX opset 18) and times the same preprocessed batch through:

* ``torch fp32``: ``Detector.predict_tensor`` + ``gaussian_smooth`` (the exported computation);
* ``torch bf16 autocast``: the same with ``precision="bf16"`` (autocast on the backbones);
* ``onnxruntime fp32`` and ``OpenVINO fp32`` (``INFERENCE_PRECISION_HINT f32``) on the ONNX file;
* ``OpenVINO default precision``: the CPU plugin's own choice (bf16 on CPUs that have it);
* ``onnxruntime INT8`` (``--int8``): dynamic quantisation of the weights of MatMul/Gemm
  (``onnxruntime.quantization.quantize_dynamic``), kept in the table only when its maps keep a
  Pearson correlation of at least ``--int8_min_corr`` (0.99) with torch fp32.

After one warm-up call each, the repeats run round-robin so that load from other processes
spreads over all rows; the table shows medians and the ratio of torch fp32 to each row
(> 1: faster than torch fp32), with each row's drift from torch fp32 (max |score|, max |map|,
map correlation).

    .venv/bin/python scripts/bench_export.py --image_size 518 --repeats 2 --threads 2
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Threads that sleep instead of spinning while they wait, set before torch is imported: the rows take turns
# on the same cores (and on a shared machine torch's spinning OpenMP threads slow it down many times over).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from tabulate import tabulate  # noqa: E402

import crane  # noqa: E402
from crane.deploy import load_model  # noqa: E402
from crane.deploy.image import preprocess  # noqa: E402
from crane.export.graph import InferenceGraph  # noqa: E402
from crane.export.writer import default_info, export_graph  # noqa: E402
from crane.models.smoothing import gaussian_smooth  # noqa: E402
from crane.models.synthetic import synthetic_clip_state_dict  # noqa: E402
from crane.deploy.runtime import kept_signal_stack  # noqa: E402
from scripts.bench_predict import random_dinov2_state_dict, test_image  # noqa: E402


def _openvino(path: Path, hint: str | None, threads: int | None):
    import openvino as ov

    core = ov.Core()
    config = {"INFERENCE_PRECISION_HINT": hint} if hint else {}
    if threads:
        config["INFERENCE_NUM_THREADS"] = str(threads)
    with kept_signal_stack():
        compiled = core.compile_model(core.read_model(str(path)), "CPU", config)
    outputs = [compiled.output(n) for n in ("scores", "maps")]

    def run(batch: np.ndarray):
        result = compiled(batch)
        return result[outputs[0]], result[outputs[1]]

    return run, str(compiled.get_property("INFERENCE_PRECISION_HINT")).split("'")[-2]  # "<Type: 'bfloat16'>"


def _int8(path: Path, folder: Path) -> Path:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    out = folder / "crane_int8.onnx"
    quantize_dynamic(str(path), str(out), weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul", "Gemm"])
    return out


def _drift(scores: np.ndarray, maps: np.ndarray, ref: tuple[np.ndarray, np.ndarray]) -> tuple[float, float, float]:
    corr = float(np.corrcoef(maps.ravel().astype(np.float64), ref[1].ravel().astype(np.float64))[0, 1])
    return float(np.abs(scores - ref[0]).max()), float(np.abs(maps - ref[1]).max()), corr


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--image_size", "--image-size", type=int, default=518, help="model input size S (default 518)")
    parser.add_argument("--batch", type=int, default=1, help="images per call (default 1)")
    parser.add_argument("--repeats", type=int, default=2, help="timed calls per row after one warm-up (default 2)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads of every runtime (default: theirs)")
    parser.add_argument("--model", choices=("crane+", "crane"), default="crane+",
                        help="crane+: random DINOv2, features 24; crane: features 6 12 18 24, soft_mean")
    parser.add_argument("--int8", action=argparse.BooleanOptionalAction, default=True,
                        help="also try onnxruntime dynamic INT8 quantisation (default: on)")
    parser.add_argument("--int8_min_corr", "--int8-min-corr", type=float, default=0.99,
                        help="map correlation with torch fp32 an INT8 row needs to be listed (default 0.99)")
    parser.add_argument("--vision_width", "--vision-width",
                        type=int, default=1024, help="CLIP vision width (default 1024: ViT-L/14)")
    parser.add_argument("--keep", type=Path, metavar="DIR", help="keep the exported files in DIR")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    size, plus = args.image_size, args.model == "crane+"

    t0 = time.perf_counter()
    clip_sd = synthetic_clip_state_dict(vision_width=args.vision_width, seed=args.seed)
    options = dict(dino_model="dinov2", dino_weights=random_dinov2_state_dict(args.seed + 1), features_list=(24,),
                   soft_mean=False) if plus else dict(features_list=(6, 12, 18, 24), soft_mean=True)
    torch.manual_seed(args.seed)
    det = crane.Detector.from_config(clip_weights=clip_sd, image_size=size, **options)
    del clip_sd
    batch = np.stack([preprocess(test_image(600, args.seed + i), size) for i in range(args.batch)])
    x = torch.from_numpy(batch)
    name = "Crane+ (dinov2, features 24)" if plus else "Crane (features 6 12 18 24, soft_mean)"
    print(f"built the model in {time.perf_counter() - t0:.1f} s: {name}, CLIP vision width {args.vision_width} "
          "(1024: ViT-L/14; random weights), "
          f"{size}x{size}, batch {args.batch}", flush=True)

    def torch_run(precision: str) -> Callable:
        def run(_batch: np.ndarray):
            det.precision = precision
            scores, maps = det.predict_tensor(x)
            return scores.numpy(), gaussian_smooth(maps, det.config.sigma).numpy()
        return run

    folder = args.keep or Path(tempfile.mkdtemp(prefix="crane_bench_export_"))
    folder.mkdir(parents=True, exist_ok=True)
    onnx_path = folder / "crane.onnx"
    t0 = time.perf_counter()
    graph = InferenceGraph.from_detector(det)
    info = default_info(graph, "random", "-", {"image_size": size}, None, False)
    export_graph(graph, onnx_path, "onnx", info)
    export_s = time.perf_counter() - t0
    print(f"exported {onnx_path} ({onnx_path.stat().st_size / 1e6:.0f} MB) in {export_s:.0f} s", flush=True)

    threads = args.threads
    rows: dict[str, Callable] = {"torch fp32": torch_run("fp32"), "torch bf16 autocast": torch_run("bf16")}
    # no spin-waiting: the rows take turns on the same cores
    ort_model = load_model(onnx_path, "onnxruntime", "cpu", threads, spin=False)
    rows["onnxruntime fp32"] = ort_model.run
    rows["OpenVINO fp32"], _ = _openvino(onnx_path, "f32", threads)
    ov_default, ov_precision = _openvino(onnx_path, None, threads)
    rows[f"OpenVINO CPU default ({ov_precision})"] = ov_default
    int8_note = None
    if args.int8:
        t0 = time.perf_counter()
        int8_path = _int8(onnx_path, folder)
        int8_note = f"quantised in {time.perf_counter() - t0:.0f} s ({int8_path.stat().st_size / 1e6:.0f} MB)"
        rows["onnxruntime INT8 (dynamic)"] = load_model(int8_path, "onnxruntime", "cpu", threads, spin=False).run

    outputs = {label: fn(batch) for label, fn in rows.items()}  # warm-up, and the outputs to compare
    times: dict[str, list[float]] = {label: [] for label in rows}
    for r in range(args.repeats):
        for label, fn in rows.items():
            start = time.perf_counter()
            fn(batch)
            times[label].append(time.perf_counter() - start)
        print(f"repeat {r + 1}/{args.repeats}: " + ", ".join(f"{k} {t[-1]:.1f} s" for k, t in times.items()),
              flush=True)

    reference = outputs["torch fp32"]
    base = statistics.median(times["torch fp32"])
    table, excluded = [], []
    for label in rows:
        median = statistics.median(times[label])
        d_score, d_map, corr = _drift(*outputs[label], reference)
        row = [label, f"{1000 * median / args.batch:.0f}", f"{base / median:.2f}", f"{d_score:.1e}", f"{d_map:.1e}",
               f"{corr:.6f}"]
        if label.startswith("onnxruntime INT8") and corr < args.int8_min_corr:
            excluded.append((label, corr, row))
            continue
        table.append(row)
    print(f"\n{name}, {size}x{size}, batch {args.batch}, median of {args.repeats}; {platform.processor() or ''} "
          f"{os.cpu_count()} CPUs; torch {torch.__version__}, onnxruntime "
          f"{__import__('onnxruntime').__version__}, openvino {__import__('openvino').__version__}; "
          f"export {export_s:.0f} s" + (f"; INT8 {int8_note}" if int8_note else ""))
    print(tabulate(table, headers=["backend", "ms / image", "speed-up vs torch fp32", "max |score diff|",
                                   "max |map diff|", "map corr"], tablefmt="github"))
    for label, corr, row in excluded:
        print(f"{label}: left out, map correlation {corr:.4f} < {args.int8_min_corr} "
              f"({row[1]} ms / image, {row[2]}x torch fp32)")
    if args.keep is None:
        for item in folder.iterdir():
            item.unlink()
        folder.rmdir()


if __name__ == "__main__":
    main()
