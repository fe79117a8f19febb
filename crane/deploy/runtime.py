"""Running an exported Crane graph with ONNX Runtime or OpenVINO (no torch).

    from crane.deploy import load_model
    model = load_model("crane.onnx")                 # or backend="openvino", "crane.xml"
    out = model.predict(["part.png", "other.jpg"])   # out.scores (N,), out.maps (N x S x S)
    out.anomalous                                     # N bools, when the export carried thresholds

The graph takes the preprocessed batch ``B x 3 x S x S`` (float32) and returns the
image scores ``B`` and the smoothed anomaly maps ``B x S x S``; everything it needs to
know (``S``, the thresholds, the model settings) is in its metadata. A graph exported
with a reference memory (few-shot, ``export --reference``) holds it as constants and
scores with it; ``model.info.reference`` records it (``None``: zero-shot) and
``model.info.reference_summary()`` says it in words.
"""
from __future__ import annotations

import ctypes
import os
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional, Union

import numpy as np

from .image import ImageInput, preprocess
from .metadata import INPUT_NAME, OUTPUT_NAMES, ExportInfo, NotACraneExport

BACKENDS = ("onnxruntime", "openvino")


@dataclass
class DeployPrediction:
    """``scores``: ``N`` float32; ``maps``: ``N x S x S`` float32 smoothed anomaly maps;
    ``anomalous``: ``scores >= image threshold`` (``None`` without an image threshold)."""

    scores: np.ndarray
    maps: np.ndarray
    anomalous: Optional[np.ndarray] = None


def _check_file(path: Path) -> None:
    if not path.is_file():
        raise FileNotFoundError(f"exported model not found: {path}")


class _OnnxRuntime:
    def __init__(self, path: Path, device: str, threads: Optional[int], spin: bool) -> None:
        import onnxruntime as ort

        available = ort.get_available_providers()
        if device in ("auto", "cpu"):
            providers = ["CUDAExecutionProvider"] if device == "auto" and "CUDAExecutionProvider" in available else []
        elif device.startswith("cuda"):
            if "CUDAExecutionProvider" not in available:
                raise RuntimeError(f"device {device!r}: this onnxruntime has no CUDA provider (install onnxruntime-gpu)")
            index = int(device.split(":")[1]) if ":" in device else 0
            providers = [("CUDAExecutionProvider", {"device_id": index})]
        else:
            raise ValueError(f"device {device!r} is not one onnxruntime knows: use cpu, cuda, cuda:N or auto")
        options = ort.SessionOptions()
        options.log_severity_level = 3  # errors only: no warnings about nodes placed on the CPU
        if threads:
            options.intra_op_num_threads = threads
        if not spin:
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        # This optimisation only concerns float16 graphs on the CPU, and onnxruntime 1.32 crashes in it while
        # creating the session of some of them: leave it out.
        self.session = ort.InferenceSession(str(path), options, providers=[*providers, "CPUExecutionProvider"],
                                            disabled_optimizers=["FuseFp16InitializerToFp32NodeTransformer"])
        self.entries = dict(self.session.get_modelmeta().custom_metadata_map)

    def __call__(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        scores, maps = self.session.run(list(OUTPUT_NAMES), {INPUT_NAME: batch})
        return scores, maps


class _SignalStack(ctypes.Structure):  # glibc's stack_t
    _fields_ = [("ss_sp", ctypes.c_void_p), ("ss_flags", ctypes.c_int), ("ss_size", ctypes.c_size_t)]


@contextmanager
def kept_signal_stack():
    """Keep the calling thread's alternate signal stack across an OpenVINO ``compile_model``.

    Workaround (OpenVINO 2026.4 CPU plugin, Linux): compiling installs the plugin's own
    alternate signal stack on the calling thread, and releasing a ``Core`` puts back the stack
    it found, which may be one that another ``Core`` has freed since. The next signal with a
    Python handler (Ctrl-C, a ``SIGCHLD`` handler) then finds an unmapped stack, and the
    kernel kills the process with a segmentation fault. With the thread's own stack kept,
    the plugin only ever puts that one back.
    """
    libc = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None
    saved = _SignalStack()
    kept = libc is not None and libc.sigaltstack(None, ctypes.byref(saved)) == 0
    try:
        yield
    finally:
        if kept:
            libc.sigaltstack(ctypes.byref(saved), None)


class _OpenVino:
    def __init__(self, path: Path, device: str, threads: Optional[int], spin: bool) -> None:
        import openvino as ov

        core = ov.Core()
        model = core.read_model(str(path))
        section = "crane" if model.has_rt_info(["crane"]) else "framework"  # IR files / ONNX files
        keys = list(model.get_rt_info()[section]) if model.has_rt_info([section]) else []
        self.entries = {(k if section == "framework" else f"crane.{k}"): model.get_rt_info([section, k]).astype(str)
                        for k in keys}
        target = {"auto": "CPU", "cpu": "CPU", "gpu": "GPU"}.get(device.lower())
        if target is None:
            raise ValueError(f"device {device!r} is not one OpenVINO knows here: use cpu, gpu or auto")
        config: dict[str, str] = {}
        if self.entries.get("crane.precision", '"fp32"') == '"fp32"':
            # OpenVINO runs bf16 by default on CPUs that have it: keep fp32 graphs in fp32.
            config["INFERENCE_PRECISION_HINT"] = "f32"
        if threads:
            config["INFERENCE_NUM_THREADS"] = str(threads)
        with kept_signal_stack():
            self.compiled = core.compile_model(model, target, config)
        self.outputs = [self.compiled.output(name) for name in OUTPUT_NAMES]

    def __call__(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        result = self.compiled(batch)
        return result[self.outputs[0]], result[self.outputs[1]]


class DeployedModel:
    """An exported graph, ready to run.

    Args:
        path: ``.onnx`` (either backend) or OpenVINO ``.xml``.
        backend: ``onnxruntime`` or ``openvino``; ``None`` picks openvino for ``.xml``, else onnxruntime.
        device: ``auto``/``cpu``/``cuda[:N]`` (onnxruntime) or ``auto``/``cpu``/``gpu`` (OpenVINO).
        threads: CPU threads (default: the runtime's choice).
        spin: let onnxruntime's threads spin-wait for work between runs (its default: lowest latency);
            ``False`` when the CPU is shared with other work.
    """

    def __init__(self, path: Union[str, os.PathLike], backend: Optional[str] = None, device: str = "auto",
                 threads: Optional[int] = None, spin: bool = True) -> None:
        self.path = Path(path).expanduser()
        backend = backend or ("openvino" if self.path.suffix == ".xml" else "onnxruntime")
        if backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r}; choose {' or '.join(BACKENDS)}")
        if backend == "onnxruntime" and self.path.suffix == ".xml":
            raise ValueError(f"{self.path} is an OpenVINO model: use backend='openvino' (--backend openvino)")
        _check_file(self.path)
        self.backend = backend
        runner = (_OnnxRuntime if backend == "onnxruntime" else _OpenVino)(self.path, device, threads, spin)
        self.info = ExportInfo.from_strings(runner.entries, str(self.path))
        self._run = runner

    @property
    def image_size(self) -> int:
        return self.info.image_size

    def preprocess(self, image: ImageInput) -> np.ndarray:
        """One image (path, PIL image or array) as the ``3 x S x S`` float32 model input."""
        return preprocess(image, self.info.image_size)

    def run(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Preprocessed ``B x 3 x S x S`` -> (scores ``B``, smoothed maps ``B x S x S``), float32."""
        batch = np.ascontiguousarray(batch, dtype=np.float32)
        s = self.info.image_size
        if batch.ndim != 4 or batch.shape[1:] != (3, s, s):
            raise ValueError(f"expected a B x 3 x {s} x {s} batch, got shape {batch.shape}")
        scores, maps = self._run(batch)
        return np.asarray(scores, np.float32), np.asarray(maps, np.float32)

    def predict(self, images: Union[ImageInput, Iterable[ImageInput]], batch_size: int = 8) -> DeployPrediction:
        """Score images (paths, PIL images or ``H x W (x C)`` arrays; one or a list)."""
        if isinstance(images, (str, os.PathLike)) or not isinstance(images, Iterable) or (
                isinstance(images, np.ndarray) and images.ndim in (2, 3)):
            images = [images]
        images = list(images)
        s = self.info.image_size
        scores: list[np.ndarray] = [np.zeros(0, np.float32)]
        maps: list[np.ndarray] = [np.zeros((0, s, s), np.float32)]
        for start in range(0, len(images), batch_size):
            sc, mp = self.run(np.stack([self.preprocess(img) for img in images[start:start + batch_size]]))
            scores.append(sc)
            maps.append(mp)
        all_scores = np.concatenate(scores)
        threshold = self.info.image_threshold
        return DeployPrediction(all_scores, np.concatenate(maps),
                                None if threshold is None else all_scores >= threshold)


def load_model(path: Union[str, os.PathLike], backend: Optional[str] = None, device: str = "auto",
               threads: Optional[int] = None, spin: bool = True) -> DeployedModel:
    """Open an exported graph (see :class:`DeployedModel`)."""
    return DeployedModel(path, backend, device, threads, spin)


__all__ = ["BACKENDS", "DeployPrediction", "DeployedModel", "ExportInfo", "NotACraneExport", "load_model"]
