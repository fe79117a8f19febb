"""The page (Gradio Blocks): an Inspect tab, a Calibrate tab and the ``predict`` API endpoint.

Every model call (inspecting, calibrating, the API) goes through one queue slot
(``concurrency_id="model"``, limit 1); moving a threshold slider only redraws the panels
and re-decides from the scores and maps kept for the session. A reference memory built in
Calibrate (few-shot) belongs to its session: that session's Inspect tab scores with it (its
sliders move to the thresholds calibrated with it); other sessions and the API keep the memory
and thresholds loaded at start. Every file the page serves
is one the app wrote into its working folder (``GRADIO_TEMP_DIR`` is set inside it by
:mod:`crane.cli.app.command` before Gradio is imported).
"""
from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any, Optional

import gradio as gr

from crane import settings
from crane.data.folders import IMAGE_SUFFIXES

from .backend import Batch, Calibration, Engine, one_line, panel, user_errors
from .uploads import UploadError, ZipLimits, stage

SESSION_SECONDS = 3600
"""How long a session's images, scores and maps are kept after its last use."""
MODEL = "model"
"""The queue's concurrency group of every model call."""
CSS = "#panels .thumbnail-item { aspect-ratio: auto; } #panels .thumbnail-item img { height: auto; }"
"""Panels are wide (three tiles): shown whole, not cropped to square thumbnails."""


def theme() -> gr.themes.Base:
    """Gradio's default look with the system's fonts (no web fonts: the page works offline)."""
    return gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"])


def _error(e: Exception) -> gr.Error:
    return gr.Error(one_line(str(e)), print_exception=False)


def _threshold(value: float, used: bool) -> Optional[float]:
    return float(value) if used else None


def _fmt(value: Optional[float]) -> str:
    return "none" if value is None else f"{value:.6g}"


def _views(batch: Optional[Batch], image_t: Optional[float], pixel_t: Optional[float]):
    """Gallery items, score rows, skipped rows and the status line of ``batch`` at these thresholds."""
    from crane.inspection.outputs import decision

    if batch is None:
        return [], [], [], "Drop images to score them."
    gallery = [(panel(item, image_t, pixel_t), f"{item.path.as_posix()} | score {item.score:.4f}"
                + (f" | {decision(item.score, image_t)}" if image_t is not None else "")) for item in batch.scored]
    rows = [[item.path.as_posix(), item.score, decision(item.score, image_t)] for item in batch.scored]
    skipped = [[path.as_posix(), reason] for path, reason in batch.skipped]
    anomalous = sum(decision(item.score, image_t) == "anomalous" for item in batch.scored)
    status = f"{len(batch.scored)} images scored"
    if batch.skipped:
        status += f", {len(batch.skipped)} unreadable (listed below)"
    status += (f"; {anomalous} anomalous at image threshold {_fmt(image_t)}" if image_t is not None
               else "; no image threshold: no decisions")
    status += f"; pixel threshold {_fmt(pixel_t)}" if pixel_t is not None else "; no pixel threshold: no outlines"
    status += f". Scored with {batch.scored_with}."
    return gallery, rows, skipped, status


def _report(calibration: Calibration) -> str:
    """``calibrate``'s report as Markdown: its table, summary lines, notes and unreadable files."""
    picked = calibration.picked
    lines = ["| " + " | ".join(picked.headers) + " |", "|" + " --- |" * len(picked.headers)]
    lines += ["| " + " | ".join(row) + " |" for row in picked.rows]
    lines += [""] + [f"- {line}" for line in picked.summary + calibration.notes]
    if calibration.memory is not None:
        lines.append(f"- reference memory of {calibration.memory.references} normal images (few-shot): the thresholds "
                     f"were calibrated by leave-one-out ({calibration.left_out} images scored against the memory "
                     "without their own patches). The Inspect tab of this page now scores with this memory and "
                     "decides at these thresholds; saving writes reference.pt beside thresholds.json")
    if calibration.skipped:
        lines += [f"- unreadable, left out: {path.as_posix()} ({reason})" for path, reason in calibration.skipped]
    return "\n".join(lines)


def _calibration_values(calibration: Calibration) -> dict[str, Any]:
    image = calibration.thresholds.meta["calibration"]["image"]
    values = {"image_threshold": calibration.thresholds.image, "pixel_threshold": calibration.thresholds.pixel,
              "target_fpr": image["target_fpr"], "normal_images": image["normal_images"], "flagged": image["flagged"],
              "expected_fpr": image["expected_fpr"], "expected_fpr_interval": image["expected_fpr_interval"],
              "interval_confidence": image["interval_confidence"], "target_reached": image["target_reached"]}
    memory = calibration.memory
    if memory is not None:
        values["reference_memory"] = {"images": memory.references, "coreset_ratio": memory.spec.coreset_ratio,
                                      "few_shot_weight": memory.spec.weight, "scoring": "leave-one-out",
                                      "leave_one_out_images": calibration.left_out}
    return values


def build_page(engine: Engine, workdir: Path, limits: ZipLimits = ZipLimits()) -> gr.Blocks:
    """The page of ``engine``; uploads and results go into new folders of ``workdir``."""
    errors = (*user_errors(), UploadError)
    start = engine.thresholds
    accepted = [*IMAGE_SUFFIXES, ".zip"]

    def new_folder(kind: str) -> Path:
        return workdir / f"{kind}-{uuid.uuid4().hex[:12]}"

    def inspect(files, memory, image_value, image_used, pixel_value, pixel_used,
                progress=gr.Progress(track_tqdm=True)):
        image_t, pixel_t = _threshold(image_value, image_used), _threshold(pixel_value, pixel_used)
        if not files:
            return None, *_views(None, image_t, pixel_t)
        folder = new_folder("inspect")
        try:
            batch = engine.score(stage([Path(f) for f in files], folder, limits), folder, memory)
        except errors as e:
            raise _error(e) from None
        return batch, *_views(batch, image_t, pixel_t)

    def redecide(batch, image_value, image_used, pixel_value, pixel_used):
        return _views(batch, _threshold(image_value, image_used), _threshold(pixel_value, pixel_used))

    def results_zip(batch, image_value, image_used, pixel_value, pixel_used):
        if batch is None:
            raise gr.Error("Nothing scored yet: drop images first.", print_exception=False)
        image_t, pixel_t = _threshold(image_value, image_used), _threshold(pixel_value, pixel_used)
        return str(engine.write_results(batch, image_t, pixel_t, new_folder("results") / "crane-results"))

    def sliders(calibration: Calibration) -> tuple:
        """The Inspect tab's threshold controls at the thresholds of ``calibration``."""
        image, pixel = calibration.thresholds.image, calibration.thresholds.pixel
        return (gr.update(value=image), True, gr.update(value=pixel if pixel is not None else 0.5),
                pixel is not None)

    def calibrate(files, rate, build, coreset_ratio, few_shot_weight, memory,
                  progress=gr.Progress(track_tqdm=True)):
        if not files:
            raise gr.Error("Drop normal images (or a zip of them) first.", print_exception=False)
        folder = new_folder("calibrate")
        try:
            stage([Path(f) for f in files], folder, limits)
            options = dict(coreset_ratio=float(coreset_ratio), few_shot_weight=float(few_shot_weight)) if build \
                else {}
            calibration = engine.calibrate(folder, float(rate), bool(build), **options)
            downloads = engine.save(calibration, new_folder("thresholds") / "thresholds.json")
        except errors as e:
            raise _error(e) from None
        # the Inspect tab scores with the memory of this calibration (the one loaded at start when none was built);
        # when that memory changes, its sliders move to the thresholds calibrated with it
        moved = sliders(calibration) if calibration.memory is not memory else (gr.update(),) * 4
        return (calibration, calibration.memory, _report(calibration), _calibration_values(calibration),
                [str(p) for p in downloads], "", *moved)

    def save(calibration):
        if calibration is None:
            raise gr.Error("Calibrate first.", print_exception=False)
        try:
            paths = engine.save(calibration)
        except errors as e:
            raise _error(e) from None
        wrote = " and ".join(str(p) for p in paths)
        keeps = "memory and thresholds" if calibration.memory is not None or engine.reference is not None \
            else "thresholds"
        return (f"Wrote {wrote}; the Inspect tab now decides with these thresholds (the API keeps the {keeps} loaded "
                "at start until the app restarts).", *sliders(calibration))

    def api_predict(image: Optional[str], image_threshold: Optional[float] = None) -> dict[str, Any]:
        """One image file -> {"score", "decision", "map_shape"}; the decision at ``image_threshold``, else at
        the image threshold loaded at start (null without one)."""
        if not image:
            raise gr.Error("no image file given", print_exception=False)
        try:
            return engine.predict_file(Path(image), image_threshold)
        except errors as e:
            raise _error(e) from None

    with gr.Blocks(title="Crane inspection", analytics_enabled=False, delete_cache=(3600, SESSION_SECONDS)) as demo:
        warning = ("\n\n**Random weights (`--clip_weights synthetic`): the scores and maps are meaningless; they only "
                   "show the page.**" if engine.random_weights else "")
        origin = f"from {start.source}" if start.image is not None or start.pixel is not None else "none"
        gr.Markdown(f"## Crane inspection\nModel: {engine.describe()}\n\nThresholds at start: image "
                    f"{_fmt(start.image)}, pixel {_fmt(start.pixel)} ({origin}); scoring with "
                    f"{engine.scored_with()}{warning}", elem_id="header")
        batch_state = gr.State(None, time_to_live=SESSION_SECONDS)
        memory_state = gr.State(None, time_to_live=SESSION_SECONDS)  # a memory built in this session's Calibrate
        with gr.Tab("Inspect", id="inspect"):
            with gr.Row():
                with gr.Column(scale=1):
                    files = gr.File(label="images (or zips of images)", file_count="multiple", file_types=accepted,
                                    type="filepath", elem_id="inspect-files")
                    image_used = gr.Checkbox(start.image is not None, label="decide with an image threshold",
                                             elem_id="image-used")
                    image_value = gr.Slider(0.0, 1.0, value=start.image if start.image is not None else 0.5,
                                            step=1e-6, label="image threshold (anomalous when score >= it)",
                                            elem_id="image-threshold")
                    pixel_used = gr.Checkbox(start.pixel is not None, label="outline with a pixel threshold",
                                             elem_id="pixel-used")
                    pixel_value = gr.Slider(0.0, 1.0, value=start.pixel if start.pixel is not None else 0.5,
                                            step=1e-6, label="pixel threshold (outlined where map >= it)",
                                            elem_id="pixel-threshold")
                    zip_button = gr.Button("Download the results (zip)", elem_id="make-zip")
                    zip_file = gr.File(label="results: scores.csv, skipped.csv, panels/, maps/, masks/ (as predict)",
                                       interactive=False, elem_id="results-zip")
                with gr.Column(scale=3):
                    status = gr.Markdown("Drop images to score them.", elem_id="inspect-status")
                    scores = gr.Dataframe(headers=["file", "score", "decision"], datatype=["str", "number", "str"],
                                          interactive=False, label="scores", elem_id="scores")
                    skipped = gr.Dataframe(headers=["file", "reason"], datatype=["str", "str"], interactive=False,
                                           label="unreadable files", elem_id="skipped")
                    gallery = gr.Gallery(label="panels: original | heat map | overlay", columns=1, height="auto",
                                         format="png", object_fit="contain", elem_id="panels")
        with gr.Tab("Calibrate", id="calibrate"):
            with gr.Row():
                with gr.Column(scale=1):
                    normal_files = gr.File(label="normal images (or zips of them)", file_count="multiple",
                                           file_types=accepted, type="filepath", elem_id="calibrate-files")
                    rate = gr.Number(0.01, label="false-alarm rate to allow on normal images", minimum=1e-6,
                                     maximum=0.999999, elem_id="target-fpr")
                    reference = settings.REFERENCE_BY_NAME
                    with gr.Group(visible=not engine.exported):  # an exported graph holds its memory inside
                        build = gr.Checkbox(False, label="Build a reference memory from these normal images "
                                                         "(few-shot)", elem_id="reference-memory")
                        coreset_ratio = gr.Number(reference["coreset_ratio"].default, label="coreset ratio (1: every "
                                                  "patch)", minimum=1e-6, maximum=1.0, elem_id="coreset-ratio")
                        few_shot_weight = gr.Number(reference["few_shot_weight"].default, label="few-shot weight",
                                                    minimum=0.0, maximum=1.0, elem_id="few-shot-weight")
                    calibrate_button = gr.Button("Calibrate", variant="primary", elem_id="calibrate")
                    save_button = gr.Button("Save thresholds.json beside the model" if engine.args.thresholds is None
                                            else f"Save to {engine.thresholds_path.name} (--thresholds)",
                                            elem_id="save-thresholds")
                    saved = gr.Markdown(elem_id="saved")
                with gr.Column(scale=3):
                    report = gr.Markdown(elem_id="calibration-report")
                    values = gr.JSON(label="thresholds", elem_id="calibration-values")
                    download = gr.File(label="thresholds.json (and reference.pt with a memory)", interactive=False,
                                       file_count="multiple", elem_id="thresholds-file")
        calibration_state = gr.State(None, time_to_live=SESSION_SECONDS)
        with gr.Row(visible=False):  # the API endpoint's own components (not the page's sliders)
            api_image = gr.File(type="filepath", file_types=accepted[:-1], label="image")
            api_threshold = gr.Number(None, label="image_threshold")
            api_result = gr.JSON(label="result")
            api_button = gr.Button()

        thresholds = [image_value, image_used, pixel_value, pixel_used]
        views = [gallery, scores, skipped, status]
        files.change(inspect, [files, memory_state, *thresholds], [batch_state, *views], concurrency_id=MODEL,
                     concurrency_limit=1, api_visibility="private")
        for control in thresholds:
            control.change(redecide, [batch_state, *thresholds], views, trigger_mode="always_last",
                           api_visibility="private", show_progress="hidden")
        zip_button.click(results_zip, [batch_state, *thresholds], zip_file, api_visibility="private")
        calibrate_button.click(calibrate, [normal_files, rate, build, coreset_ratio, few_shot_weight, memory_state],
                               [calibration_state, memory_state, report, values, download, saved, *thresholds],
                               concurrency_id=MODEL, concurrency_limit=1, api_visibility="private")
        save_button.click(save, calibration_state, [saved, *thresholds], api_visibility="private")
        api_button.click(api_predict, [api_image, api_threshold], api_result, api_name="predict",
                         concurrency_id=MODEL, concurrency_limit=1)
    return demo


__all__ = ["CSS", "build_page", "theme"]
