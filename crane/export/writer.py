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

A reference memory (few-shot) becomes constants of the graph: each bank's chunks of
:data:`crane.models.memory.CHUNK` rows are folded into transposed ``E x CHUNK`` initializers
(one ``MatMul`` + ``ReduceMax`` each). They count towards the ~1.9 GB above which the weights go
to an external data file (:func:`external_data`), as the model's weights do. The memory's own size is
limited at export (:data:`REFERENCE_BUDGET_MB`, :func:`fitting_ratio`).
"""
from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from ..deploy.metadata import INPUT_NAME, OUTPUT_NAMES, PREFIX, ExportInfo
from ..files import file_identity
from ..models.memory import ReferenceMemory, coreset_size
from .graph import InferenceGraph

OPSET = 18
FORMATS = ("onnx", "openvino")
SUFFIXES = {"onnx": ".onnx", "openvino": ".xml"}
_SINGLE_FILE_LIMIT = 1_900_000_000  # bytes of weights kept inside one .onnx (protobuf's limit is 2 GiB)
REFERENCE_BUDGET_MB = 1024.0
"""Default largest reference memory ``export`` puts into a graph (MiB of fp32 constants, ``--max_reference_mb``):
a K = 64 memory at 518 px, 87,616 rows of 768 values per bank, is 257 MiB a bank: Crane's one bank (E-Attn
layers aliased, quirk 1) and Crane+'s three (``features_list 24``: D-Attn, E-Attn, DINOv2) fit, four banks
(1,027 MiB) do not. The model's own ~1.3-1.7 GB of weights come on top (external data from ~1.9 GB,
:func:`external_data`)."""


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


def external_data(weight_bytes: int, path: Path) -> Optional[str]:
    """The external data file name of an ONNX file ``path`` holding ``weight_bytes`` of initializers (the model's
    weights, the text features and any reference memory): ``path.data`` past :data:`_SINGLE_FILE_LIMIT`
    (protobuf cannot hold 2 GiB in one file), else ``None`` (one file)."""
    return f"{path.name}.data" if weight_bytes > _SINGLE_FILE_LIMIT else None


def _save_onnx(model, path: Path) -> None:
    import onnx_ir as ir

    ir.save(model, path, external_data=external_data(_weight_bytes(model), path))


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


def reference_bytes(references: int, patches: int, widths: Sequence[int], ratio: float) -> int:
    """Bytes of the fp32 banks of a memory of ``references`` images of ``patches`` patches each, one bank per
    feature width in ``widths``, after a coreset of ``ratio`` (:func:`crane.models.memory.coreset_size`)."""
    rows = coreset_size(references * patches, ratio)
    return sum(rows * int(w) * 4 for w in widths)


def fitting_ratio(references: int, patches: int, widths: Sequence[int], budget: int) -> Optional[float]:
    """The coreset ratio whose memory (:func:`reference_bytes`) fits in ``budget`` bytes: ``budget`` over the
    full memory's bytes, rounded down to two significant digits (and lowered by that digit while rounding the
    rows up still passes the budget); ``1.0`` when the full memory fits, ``None`` when not even one row per bank
    does."""
    import math

    full = reference_bytes(references, patches, widths, 1.0)
    if full <= budget:
        return 1.0
    exponent = math.floor(math.log10(budget / full)) - 1
    digits = math.floor(budget / full / 10.0 ** exponent)
    while digits > 0:
        ratio = float(f"{digits}e{exponent}")
        if reference_bytes(references, patches, widths, ratio) <= budget:
            return ratio
        digits -= 1
    return None


def reference_record(memory: ReferenceMemory, source: Optional[os.PathLike] = None) -> dict[str, Any]:
    """What an exported graph's metadata records of the reference ``memory`` it holds
    (:attr:`crane.deploy.metadata.ExportInfo.reference`); ``source``: the ``reference.pt`` it was read from
    (``None``: built from images at export), recorded by path and :func:`crane.files.file_identity`."""
    spec = memory.spec
    return {"references": memory.references, "banks": len(memory.banks),
            "rows_per_bank": [int(b.features.shape[0]) for b in memory.banks],
            "feature_widths": [int(b.features.shape[1]) for b in memory.banks], "bytes": memory.nbytes(),
            "coreset_ratio": float(spec.coreset_ratio), "covering_radii": list(memory.radii),
            "few_shot_weight": float(spec.weight), "scale": float(spec.scale), "shift": float(spec.shift),
            "patches_per_image": int(spec.patches_per_image), "token_sets": list(spec.sets),
            "vfm_bank": bool(spec.use_vfm),
            "images": memory.info.get("images", [{"digest": d} for d in spec.digests]),
            "path": None if source is None else str(Path(source).expanduser().resolve()),
            "identity": file_identity(source), "provenance": memory.info.get("provenance")}


def default_info(graph: InferenceGraph, checkpoint: str, checkpoint_sha256: str, model_options: dict,
                 thresholds: Optional[dict], fp16: bool, reference_source: Optional[os.PathLike] = None
                 ) -> ExportInfo:
    """The metadata of an export of ``graph`` (with its reference memory's record, :func:`reference_record`,
    when it holds one; ``reference_source``: the ``reference.pt`` it came from)."""
    import dataclasses
    import datetime

    from .. import __version__

    config = dataclasses.asdict(graph.model.config)
    config["features_list"] = list(config["features_list"])
    extra = {"crane_version": __version__, "torch_version": torch.__version__, "opset": OPSET,
             "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    return ExportInfo(image_size=graph.image_size, sigma=float(graph.model.config.sigma), model=dict(model_options),
                      config=config, checkpoint=str(checkpoint), checkpoint_sha256=checkpoint_sha256,
                      precision="fp16" if fp16 else "fp32", thresholds=thresholds, extra=extra,
                      reference=None if graph.memory is None else reference_record(graph.memory, reference_source))
