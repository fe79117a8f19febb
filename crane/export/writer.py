"""Writing an :class:`InferenceGraph` as ONNX or OpenVINO IR, with its metadata.

Exporter: torch's ``torch.export``-based ONNX exporter (``dynamo=True``) at opset 18.
The legacy TorchScript exporter traces tensor sizes as tensors, which breaks the
model's ``round(n ** 0.5)`` grid arithmetic (it would need edits in the model code),
and it is deprecated; the ``torch.export`` one takes the model as it is, with a
symbolic batch dimension. ``scaled_dot_product_attention`` is lowered to
``MatMul``/``Softmax`` and the interpolations to ``Resize`` (opset 18 is the first
with ``Resize(antialias)``, which timm's DINOv2 position-embedding resampling uses
while exporting); no custom ops. Constant sub-graphs (the position embeddings) are
folded afterwards, so the graph holds only the per-image work.

OpenVINO IR is converted from that ONNX graph (``openvino.convert_model``), so both
formats hold the same graph.
"""
from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Optional

import torch

from ..deploy.metadata import INPUT_NAME, OUTPUT_NAMES, PREFIX, ExportInfo
from .graph import InferenceGraph

OPSET = 18
FORMATS = ("onnx", "openvino")
SUFFIXES = {"onnx": ".onnx", "openvino": ".xml"}
_SINGLE_FILE_LIMIT = 1_900_000_000  # bytes of weights kept inside one .onnx (protobuf's limit is 2 GiB)


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def onnx_model(graph: InferenceGraph, fp16: bool = False):
    """The graph as an ``onnx_ir.Model`` (batch dimension ``batch``; inputs and outputs float32)."""
    import onnx_ir as ir
    import onnxscript.optimizer

    size = graph.image_size
    example = torch.zeros(2, 3, size, size)  # batch 2: a batch of 1 would be specialised as a constant
    with torch.no_grad():
        program = torch.onnx.export(graph.eval(), (example,), dynamo=True, opset_version=OPSET,
                                    input_names=[INPUT_NAME], output_names=list(OUTPUT_NAMES),
                                    dynamic_shapes={"images": {0: torch.export.Dim("batch")}},
                                    optimize=False, verbose=False)
    # The exporter's optimisation pass, but folding whatever does not depend on the images, however large
    # (its default limits leave the position-embedding resampling of the VFM in the graph).
    model = onnxscript.optimizer.optimize(program.model, input_size_limit=1 << 40, output_size_limit=1 << 40)
    return to_fp16(model) if fp16 else model


def to_fp16(model):
    """An ``onnx_ir.Model`` with float16 weights and arithmetic, float32 inputs and outputs (onnxruntime's
    converter, with its list of operators kept in float32)."""
    import onnx_ir as ir
    from onnxruntime.transformers.float16 import convert_float_to_float16

    converted = ir.from_proto(convert_float_to_float16(ir.to_proto(model), keep_io_types=True))
    converted.graph.sort()  # the converter appends its input casts at the end of the node list
    converted.metadata_props.update(model.metadata_props)
    if PREFIX + "precision" in converted.metadata_props:
        converted.metadata_props[PREFIX + "precision"] = json.dumps("fp16")
    return converted


def _weight_bytes(model) -> int:
    return sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None)


def _publish(folder: Path, out: Path) -> list[Path]:
    """Move every file written in ``folder`` beside ``out`` (replacing older ones); return the new paths."""
    moved = []
    for item in sorted(folder.iterdir()):
        target = out.parent / item.name
        os.replace(item, target)
        moved.append(target)
    return moved


def _save_onnx(model, path: Path) -> None:
    import onnx_ir as ir

    external = f"{path.name}.data" if _weight_bytes(model) > _SINGLE_FILE_LIMIT else None
    ir.save(model, path, external_data=external)


def export_onnx(graph: InferenceGraph, out: os.PathLike, info: ExportInfo, fp16: bool = False) -> list[Path]:
    """Write ``out`` (``.onnx``; plus ``out.data`` beyond ~1.9 GB of weights) atomically; return the files."""
    out = Path(out)
    model = onnx_model(graph, fp16)
    model.metadata_props.update(info.to_strings())
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.") as tmp:
        _save_onnx(model, Path(tmp) / out.name)
        stale = out.parent / f"{out.name}.data"
        if not (Path(tmp) / stale.name).exists():
            stale.unlink(missing_ok=True)
        return _publish(Path(tmp), out)


def onnx_to_openvino(onnx_path: os.PathLike, out: os.PathLike, fp16: bool = False) -> list[Path]:
    """Convert an exported ``.onnx`` graph to the OpenVINO IR ``out`` (``.xml`` + ``.bin``) atomically, its
    metadata under the ``crane`` section of ``rt_info``; ``fp16`` stores the weights in float16 (OpenVINO's
    ``compress_to_fp16``). Returns the files."""
    import openvino as ov

    out = Path(out)
    _log("converting to OpenVINO IR ...")
    model = ov.convert_model(str(onnx_path))
    framework = list(model.get_rt_info()["framework"]) if model.has_rt_info(["framework"]) else []
    for key in framework:  # the ONNX metadata_props
        if key.startswith(PREFIX):
            model.set_rt_info(model.get_rt_info(["framework", key]).astype(str), ["crane", key[len(PREFIX):]])
    if fp16:
        model.set_rt_info(json.dumps("fp16"), ["crane", "precision"])
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.") as tmp:
        ov.save_model(model, str(Path(tmp) / out.name), compress_to_fp16=fp16)
        return _publish(Path(tmp), out)


def export_openvino(graph: InferenceGraph, out: os.PathLike, info: ExportInfo, fp16: bool = False) -> list[Path]:
    """Write the OpenVINO IR ``out`` (``.xml`` + ``.bin``), converted from the fp32 ONNX graph (see
    :func:`onnx_to_openvino`); return the files."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.onnx.") as tmp:
        onnx_path = Path(tmp) / "model.onnx"
        export_onnx(graph, onnx_path, info)
        return onnx_to_openvino(onnx_path, out, fp16)


def export_graph(graph: InferenceGraph, out: os.PathLike, fmt: str, info: ExportInfo, fp16: bool = False
                 ) -> list[Path]:
    """Export ``graph`` in ``fmt`` (``onnx`` or ``openvino``) with ``info`` as metadata."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown export format {fmt!r}; choose {' or '.join(FORMATS)}")
    _log(f"exporting the graph (torch.export -> ONNX opset {OPSET}{', fp16' if fp16 else ''}) ...")
    writer = export_onnx if fmt == "onnx" else export_openvino
    return writer(graph, out, info, fp16)


def default_info(graph: InferenceGraph, checkpoint: str, checkpoint_sha256: str, model_options: dict,
                 thresholds: Optional[dict], fp16: bool) -> ExportInfo:
    """The metadata of an export of ``graph``."""
    import dataclasses
    import datetime

    from .. import __version__

    config = dataclasses.asdict(graph.model.config)
    config["features_list"] = list(config["features_list"])
    extra = {"crane_version": __version__, "torch_version": torch.__version__, "opset": OPSET,
             "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    return ExportInfo(image_size=graph.image_size, sigma=float(graph.model.config.sigma), model=dict(model_options),
                      config=config, checkpoint=str(checkpoint), checkpoint_sha256=checkpoint_sha256,
                      precision="fp16" if fp16 else "fp32", thresholds=thresholds, extra=extra)
