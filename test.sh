#!/usr/bin/env bash
# Reproduce Table 1 of the paper (Crane and Crane+, 14 datasets) from the official checkpoints.
#
#   bash test.sh DEVICE [DATASET ...]
#
#   DEVICE   a GPU index (0), several GPUs (0,1,2,3: one process per GPU), or cpu
#   DATASET  any of the 14 keys below (default: all of them)
#
# Protocol (method.md section 7): zero-shot; MVTec AD is evaluated with the
# VisA-trained checkpoints, every other set with the MVTec-trained ones, except
#   Crane   dino none,   features 6 12 18 24, soft_mean True,  epoch 5
#   Crane+  dino dinov2, features 24,          soft_mean False, epoch 5
#           DAGM: VisA-trained checkpoint, soft_mean True
#           medical sets: epoch 1, soft_mean True
# AUPRO is the published 200-threshold definition (--aupro_method crane).
#
# Inputs (checked before anything runs):
#   checkpoints   $CHECKPOINTS/trained_on_{mvtec,visa}_{crane,cranep}/epoch_{1,5}.pth (default checkpoints/;
#                 bash scripts/download_weights.sh puts them there)
#   datasets      $CRANE_DATASETS/KEY/meta.json (default ./datasets/data; python -m datasets.generate KEY FOLDER)
#   CLIP weights  $CLIP_WEIGHTS (default openai: the local cache) ; DINOv2: $DINO_WEIGHTS (default: the cache)
# Output: $RESULTS/{crane,cranep}/KEY/ (metrics.json, metrics.md, predictions.csv), then
#         $RESULTS/table1.md and table1.csv (default RESULTS=results/table1). Re-running resumes:
#         finished classes are not recomputed. Other env: PYTHON (.venv/bin/python), BATCH_SIZE (8).
set -euo pipefail
cd "$(dirname "$0")"

INDUSTRIAL=(mvtec visa mpdd btad sdd dagm dtd)
MEDICAL=(headct brainmri br35h isic cvc-colondb cvc-clinicdb tn3k)
ALL=("${INDUSTRIAL[@]}" "${MEDICAL[@]}")

die() { echo "test.sh: $*" >&2; exit 2; }

[ $# -ge 1 ] || die "usage: bash test.sh DEVICE [DATASET ...]  (DEVICE: GPU index such as 0, a list such as 0,1,2,3, or cpu)"
DEVICE=$1
shift
DATASETS=("$@")
[ ${#DATASETS[@]} -gt 0 ] || DATASETS=("${ALL[@]}")

PY=${PYTHON:-.venv/bin/python}
ROOT=${CRANE_DATASETS:-./datasets/data}
CKPTS=${CHECKPOINTS:-checkpoints}
RESULTS=${RESULTS:-results/table1}
CLIP=${CLIP_WEIGHTS:-openai}
DINO=${DINO_WEIGHTS:-}
BATCH=${BATCH_SIZE:-8}

[ -x "$PY" ] || die "$PY not found; run 'bash setup.sh' first (or set PYTHON)"
if [ "$DEVICE" = cpu ]; then
    DEVICE_FLAGS=(--device cpu)
elif [[ "$DEVICE" =~ ^[0-9]+(,[0-9]+)*$ ]]; then
    DEVICE_FLAGS=(--device cuda --devices ${DEVICE//,/ })
else
    die "DEVICE must be a GPU index (0), a comma-separated list (0,1,2,3) or cpu, got '$DEVICE'"
fi

is_medical() { [[ " ${MEDICAL[*]} " == *" $1 "* ]]; }

# protocol METHOD DATASET -> "CHECKPOINT_FOLDER EPOCH SOFT_MEAN"
protocol() {
    local method=$1 ds=$2 source=mvtec
    [ "$ds" = mvtec ] && source=visa
    if [ "$method" = crane ]; then
        echo "trained_on_${source}_crane 5 True"
    elif [ "$ds" = dagm ]; then
        echo "trained_on_visa_cranep 5 True"
    elif is_medical "$ds"; then
        echo "trained_on_mvtec_cranep 1 True"
    else
        echo "trained_on_${source}_cranep 5 False"
    fi
}

# ---- check everything before the first evaluation
missing_ckpt=() missing_data=()
for ds in "${DATASETS[@]}"; do
    [[ " ${ALL[*]} " == *" $ds "* ]] || die "unknown dataset '$ds'; choose from: ${ALL[*]}"
    [ -f "$ROOT/$ds/meta.json" ] || missing_data+=("$ROOT/$ds/meta.json")
    for method in crane cranep; do
        read -r name epoch _ <<< "$(protocol "$method" "$ds")"
        file="$CKPTS/$name/epoch_$epoch.pth"
        [ -f "$file" ] || [[ " ${missing_ckpt[*]-} " == *" $file "* ]] || missing_ckpt+=("$file")
    done
done
if [ ${#missing_ckpt[@]} -gt 0 ]; then
    die "missing official checkpoint(s): ${missing_ckpt[*]}
  fetch them with 'bash scripts/download_weights.sh', or copy them there by hand (or set CHECKPOINTS=FOLDER)"
fi
if [ ${#missing_data[@]} -gt 0 ]; then
    die "missing dataset(s) (no meta.json): ${missing_data[*]}
  unpack each archive to $ROOT/KEY and run 'python -m datasets.generate KEY $ROOT/KEY' (README, Datasets);
  set CRANE_DATASETS to use another root, or name the datasets to run, e.g.: bash test.sh $DEVICE mvtec visa"
fi
if [ "$CLIP" = openai ]; then
    "$PY" -c "from crane.models.clip_loader import resolve_openai_weights; resolve_openai_weights()" \
        || die "OpenAI CLIP weights not found (see above); or set CLIP_WEIGHTS=/path/to/ViT-L-14-336px.pt"
elif [ ! -f "$CLIP" ]; then
    die "CLIP_WEIGHTS file not found: $CLIP"
fi
[ -z "$DINO" ] || [ -f "$DINO" ] || die "DINO_WEIGHTS file not found: $DINO"

# ---- evaluate
for ds in "${DATASETS[@]}"; do
    for method in crane cranep; do
        read -r name epoch soft <<< "$(protocol "$method" "$ds")"
        if [ "$method" = crane ]; then
            model=(--dino_model none --features_list 6 12 18 24)
        else
            model=(--dino_model dinov2 --features_list 24 ${DINO:+--dino_weights "$DINO"})
        fi
        echo "==> $method on $ds: $name/epoch_$epoch.pth, soft_mean $soft"
        "$PY" test.py --dataset "$ds" --datasets_root_dir "$ROOT" --model_name "$name" --epoch "$epoch" \
            --checkpoint "$CKPTS/$name/epoch_$epoch.pth" --clip_weights "$CLIP" "${model[@]}" \
            --soft_mean "$soft" --image_size 518 --sigma 4 --batch_size "$BATCH" --aupro_method crane \
            --save_path "$RESULTS/$method/$ds" "${DEVICE_FLAGS[@]}"
    done
done

"$PY" scripts/make_table.py "$RESULTS" --paper
