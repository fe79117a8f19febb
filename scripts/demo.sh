#!/usr/bin/env bash
# The whole pipeline on a generated synthetic dataset, offline, on the CPU (about 1-3 minutes):
#   1. python -m datasets.synthetic  -> textured images with drawn defects and masks (custom layout + meta.json)
#   2. python test.py --visualize    -> per-class metrics table and panels with the ground truth outlined
#   3. python -m crane calibrate     -> image and pixel thresholds (thresholds.json)
#   4. python -m crane predict       -> scores.csv with decisions, panels, binary masks
# Results: results/demo/ (DEMO_OUT). Weights: OpenAI CLIP when it is in the local cache, else random
# ("synthetic") CLIP weights; the official Crane checkpoint when present, else a random one. With
# random weights the numbers are meaningless: the demo then only exercises the pipeline, and says so.
#
# Environment: PYTHON (default .venv/bin/python), DEMO_OUT (results/demo), DEMO_IMAGE_SIZE (224),
# DEMO_DEVICE (cpu), DEMO_CLIP (auto | openai | synthetic).
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || { echo "demo: $PY not found; run 'bash setup.sh' first (or set PYTHON)" >&2; exit 1; }
OUT=${DEMO_OUT:-results/demo}
SIZE=${DEMO_IMAGE_SIZE:-224}
DEVICE=${DEMO_DEVICE:-cpu}
CLIP=${DEMO_CLIP:-auto}
DATA="$OUT/data"
NAME=synthetic
export HF_HUB_OFFLINE=1  # the demo never downloads anything

step() { printf '\n==> %s\n' "$*"; }

if [ "$CLIP" = auto ]; then
    if "$PY" -c "from crane.models.clip_loader import resolve_openai_weights; resolve_openai_weights()" 2>/dev/null; then
        CLIP=openai
    else
        CLIP=synthetic
    fi
fi

CHECKPOINT=""
for candidate in checkpoints/trained_on_mvtec_crane/epoch_5.pth ../shared/conformance/checkpoints/trained_on_mvtec_crane/epoch_5.pth; do
    if [ -f "$candidate" ]; then CHECKPOINT=$candidate; break; fi
done
RANDOM_CHECKPOINT=0
MODEL_NAME=trained_on_mvtec_crane
if [ -z "$CHECKPOINT" ]; then
    CHECKPOINT="$OUT/random_checkpoint/epoch_0.pth"
    RANDOM_CHECKPOINT=1
    MODEL_NAME=random_prompts
fi

banner() {
    if [ "$CLIP" = synthetic ] || [ "$RANDOM_CHECKPOINT" = 1 ]; then
        local why=""
        [ "$CLIP" = synthetic ] && why="random CLIP weights (--clip_weights synthetic: OpenAI CLIP is not in the cache)"
        if [ "$RANDOM_CHECKPOINT" = 1 ]; then
            why="${why:+$why; }a random prompt-learner checkpoint (no official checkpoint in checkpoints/)"
        fi
        cat <<EOF
################################################################################
#  DEMO WITH RANDOM WEIGHTS: THE NUMBERS AND HEAT MAPS ARE MEANINGLESS.
#  Uses $why.
#  It only shows that the pipeline runs end to end. For real results fetch the
#  weights (bash scripts/download_weights.sh, see checkpoints/README.md).
################################################################################
EOF
    fi
}

# Crane (no D-Attn, so no DINOv2 weights needed) with its published test settings.
MODEL=(--checkpoint "$CHECKPOINT" --model_name "$MODEL_NAME" --clip_weights "$CLIP" --dino_model none --features_list 6 12 18 24
       --soft_mean True --image_size "$SIZE")

banner
echo "demo: CLIP weights: $CLIP; checkpoint: $CHECKPOINT; image size: $SIZE; device: $DEVICE; output: $OUT/"
rm -rf "$OUT/eval" "$OUT/predict" "$OUT/thresholds.json"

step "1/4 generating the synthetic dataset in $DATA/$NAME"
"$PY" -m datasets.synthetic "$DATA/$NAME" --classes 2 --train 0 --test_normal 4 --test_anomalous 4 --size 256 \
    --seed 0 --overwrite

if [ "$RANDOM_CHECKPOINT" = 1 ]; then
    "$PY" -m crane init-checkpoint "$CHECKPOINT" --clip_weights "$CLIP"
fi

step "2/4 evaluating with test.py (metrics table, panels with the ground truth)"
"$PY" test.py --dataset "$NAME" --datasets_root_dir "$DATA" "${MODEL[@]}" --device "$DEVICE" --devices 0 \
    --batch_size 4 --save_path "$OUT/eval" --visualize True

step "3/4 calibrating thresholds on the labelled test images"
"$PY" -m crane calibrate --dataset "$NAME" --datasets_root_dir "$DATA" "${MODEL[@]}" --device "$DEVICE" \
    --batch_size 4 --output "$OUT/thresholds.json"

step "4/4 predicting on the test images as if they were new photos"
mapfile -t IMAGES < <(find "$DATA/$NAME/test" -type f -name '*.png' -not -path '*/masks/*' | sort)
"$PY" -m crane predict "${IMAGES[@]}" "${MODEL[@]}" --device "$DEVICE" --batch_size 4 \
    --thresholds "$OUT/thresholds.json" --out "$OUT/predict" --save_masks

step "results"
cat <<EOF
metrics table:    $OUT/eval/metrics.md
test.py panels:   $OUT/eval/visualization/<class>/   (ground truth outlined in green)
thresholds:       $OUT/thresholds.json   (calibrated on the same images: optimistic, for the demo only)
scores:           $OUT/predict/scores.csv
predict panels:   $OUT/predict/panels/
binary masks:     $OUT/predict/masks/
EOF
echo
cat "$OUT/eval/metrics.md"
echo
head -n 5 "$OUT/predict/scores.csv"
echo "..."
banner
