#!/usr/bin/env bash
# Reproduce Table 1 end to end: train Crane and Crane+ on MVTec AD and on VisA, then evaluate
# all 14 datasets with the protocol of method.md section 7 (test.sh) and build the table.
#
#   bash reproduce.sh NAME DEVICE [DATASET ...]
#
#   NAME     run name: everything goes to runs/NAME/ (override with RUNS=FOLDER)
#   DEVICE   a GPU index (0), several GPUs (0,1,2,3), or cpu
#   DATASET  evaluation sets (default: all 14; training always needs mvtec and visa)
#
# Training (train.py defaults: Adam lr 1e-3, betas (0.6, 0.999), batch 8, 5 epochs, seed 111,
# image size 518, image-conditioned prompts, the test split of the auxiliary set):
#   Crane   --dino_model none   --features_list 6 12 18 24
#   Crane+  --dino_model dinov2 --features_list 24
# into runs/NAME/checkpoints/trained_on_{mvtec,visa}_{crane,cranep}/epoch_{1..5}.pth. Each image
# is encoded once, so one GPU trains a model in minutes: training runs on the first GPU of DEVICE,
# evaluation on all of them. The feature cache is kept in memory (a ViT-L run holds 4-8 MB per
# training image). Then test.sh evaluates with those checkpoints into runs/NAME/results/ and writes
# runs/NAME/results/table1.md and table1.csv (next to the published numbers).
#
# Re-running the same command resumes: finished epochs and finished classes are not recomputed.
# Environment: CRANE_DATASETS (./datasets/data), CLIP_WEIGHTS (openai), DINO_WEIGHTS (the cache),
# PYTHON (.venv/bin/python), BATCH_SIZE (evaluation batch, 8), SEED (111).
set -euo pipefail
cd "$(dirname "$0")"

INDUSTRIAL=(mvtec visa mpdd btad sdd dagm dtd)
MEDICAL=(headct brainmri br35h isic cvc-colondb cvc-clinicdb tn3k)
ALL=("${INDUSTRIAL[@]}" "${MEDICAL[@]}")

die() { echo "reproduce.sh: $*" >&2; exit 2; }

[ $# -ge 2 ] || die "usage: bash reproduce.sh NAME DEVICE [DATASET ...]  (DEVICE: GPU index such as 0, a list such as 0,1,2,3, or cpu)"
NAME=$1
DEVICE=$2
shift 2
EVAL=("$@")
[ ${#EVAL[@]} -gt 0 ] || EVAL=("${ALL[@]}")
[[ "$NAME" =~ ^[A-Za-z0-9._-]+$ ]] || die "NAME may hold letters, digits, '.', '_' and '-' only, got '$NAME'"

PY=${PYTHON:-.venv/bin/python}
ROOT=${CRANE_DATASETS:-./datasets/data}
RUN=${RUNS:-runs}/$NAME
CLIP=${CLIP_WEIGHTS:-openai}
DINO=${DINO_WEIGHTS:-}
SEED=${SEED:-111}

[ -x "$PY" ] || die "$PY not found; run 'bash setup.sh' first (or set PYTHON)"
if [ "$DEVICE" = cpu ]; then
    TRAIN_DEVICE=(--device cpu)
elif [[ "$DEVICE" =~ ^[0-9]+(,[0-9]+)*$ ]]; then
    TRAIN_DEVICE=(--device cuda --devices "${DEVICE%%,*}")
else
    die "DEVICE must be a GPU index (0), a comma-separated list (0,1,2,3) or cpu, got '$DEVICE'"
fi

# ---- check every input before hours of work
missing=()
for ds in mvtec visa "${EVAL[@]}"; do
    [[ " ${ALL[*]} " == *" $ds "* ]] || die "unknown dataset '$ds'; choose from: ${ALL[*]}"
    [ -f "$ROOT/$ds/meta.json" ] || [[ " ${missing[*]-} " == *" $ROOT/$ds/meta.json "* ]] \
        || missing+=("$ROOT/$ds/meta.json")
done
if [ ${#missing[@]} -gt 0 ]; then
    die "missing dataset(s) (no meta.json): ${missing[*]}
  unpack each archive to $ROOT/KEY and run 'python -m datasets.generate KEY $ROOT/KEY' (README, Datasets);
  set CRANE_DATASETS to use another root; training needs mvtec and visa, evaluation the sets named
  (default all 14), e.g.: bash reproduce.sh $NAME $DEVICE mvtec visa"
fi
if [ "$CLIP" = openai ]; then
    "$PY" -c "from crane.models.clip_loader import resolve_openai_weights; resolve_openai_weights()" \
        || die "OpenAI CLIP weights not found (see above); or set CLIP_WEIGHTS=/path/to/ViT-L-14-336px.pt"
elif [ ! -f "$CLIP" ]; then
    die "CLIP_WEIGHTS file not found: $CLIP"
fi
if [ -n "$DINO" ]; then
    [ -f "$DINO" ] || die "DINO_WEIGHTS file not found: $DINO"
else
    "$PY" -c "from crane.models.vfm import load_vfm; load_vfm('dinov2')" \
        || die "DINOv2 weights not found (see above); or set DINO_WEIGHTS=/path/to/dinov2_vitb14_reg4_pretrain.pth"
fi

# ---- train
for source in mvtec visa; do
    for method in crane cranep; do
        if [ "$method" = crane ]; then
            model=(--dino_model none --features_list 6 12 18 24)
        else
            model=(--dino_model dinov2 --features_list 24 ${DINO:+--dino_weights "$DINO"})
        fi
        echo "==> training $method on $source -> $RUN/checkpoints/trained_on_${source}_${method}"
        "$PY" train.py --dataset "$source" --datasets_root_dir "$ROOT" --model_name "$method" \
            --save_path "$RUN/checkpoints" --clip_weights "$CLIP" "${model[@]}" --seed "$SEED" \
            --epoch 5 --save_freq 1 --resume "${TRAIN_DEVICE[@]}"
    done
done

# ---- evaluate (test.sh checks its inputs again, resumes finished classes and builds the table)
CHECKPOINTS="$RUN/checkpoints" RESULTS="$RUN/results" CRANE_DATASETS="$ROOT" CLIP_WEIGHTS="$CLIP" \
    DINO_WEIGHTS="$DINO" PYTHON="$PY" bash test.sh "$DEVICE" "${EVAL[@]}"
echo "==> table: $RUN/results/table1.md"
