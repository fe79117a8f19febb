#!/usr/bin/env bash
# Train Crane and Crane+ on MVTec AD and on VisA, then evaluate them on the 14 datasets and build Table 1.
#
#   bash reproduce.sh NAME DEVICE [DATASET ...]        (bash reproduce.sh --help: this text)
#
#   NAME     run name: checkpoints go to checkpoints/trained_on_{mvtec,visa}_NAME_{crane,cranep}/
#   DEVICE   a GPU index (0), several GPUs (0,1,2,3: training on the first, evaluation on all), or cpu
#   DATASET  evaluation sets (default: all 14). Only the models these evaluations use are trained:
#            the VisA-trained ones evaluate mvtec (and, Crane+, dagm), the MVTec-trained ones the rest
#
# Follows the published reproduce.sh (github.com/AlirezaSalehy/Crane) line for line: the same
# train.py and test.py commands in the same order. Training uses train.py's published defaults
# (Adam lr 1e-3, betas (0.6, 0.999), batch 8, 5 epochs, seed 111, image size 518, image-conditioned
# prompts, the test split of the auxiliary set); Crane+ is trained with the batch-wide D-Attn mean
# (--dattn_batch_mean True), as the published training computed it, and evaluated with it over the
# published batches. Unlike test.sh, the published reproduce.sh evaluates Crane+ with soft_mean True
# on every set and DAGM with the VisA-trained Crane+; so does this script.
# What it adds: every input is checked first, re-running resumes (finished epochs and classes are
# kept), results go to $RESULTS/{crane,cranep}/DATASET/ (default results/reproduce_NAME) and the
# table is built at the end. Environment: see scripts/table1.sh (also SEED, default 111).
set -euo pipefail
for arg in "$@"; do   # the comment above is the help
    [[ $arg != -h && $arg != --help ]] || { sed -n '2,/^[^#]/s/^# \{0,1\}//p' "$0"; exit 0; }
done
cd "$(dirname "$0")"
SCRIPT=reproduce.sh
[ $# -ge 2 ] || { echo "usage: bash reproduce.sh NAME DEVICE [DATASET ...]  (DEVICE: GPU index such as 0, a list such as 0,1,2,3, or cpu)" >&2; exit 2; }
NAME=$1
shift
[[ "$NAME" =~ ^[A-Za-z0-9._-]+$ ]] || { echo "reproduce.sh: NAME may hold letters, digits, '.', '_' and '-' only, got '$NAME'" >&2; exit 2; }
SCRIPT_ARGS="$NAME $1"
source scripts/table1.sh
table1_init "$@"
RESULTS=${RESULTS:-results/reproduce_$NAME}
SEED=${SEED:-111}

MEDICALS="brainmri headct br35h isic tn3k cvc-colondb cvc-clinicdb"

# train MODEL_NAME DATASET TRAIN_FLAG ...: one published train.py line (resumable), skipped when no
# selected evaluation uses the model
train() {
    local name=$1 dataset=$2 dino=dinov2 i
    shift 2
    [ "$TABLE1_MODE" != plan ] || return 0
    if ! used "trained_on_${dataset}_${name}"; then
        [ "$TABLE1_MODE" != run ] || echo "==> not training $name on $dataset: no selected dataset is evaluated with it"
        return 0
    fi
    local flags=("$@")
    for ((i = 0; i + 1 < ${#flags[@]}; i++)); do [ "${flags[i]}" != --dino_model ] || dino=${flags[i + 1]}; done
    local extra=()
    [ "$dino" = none ] || extra=(${DINO:+--dino_weights "$DINO"})
    if [ "$TABLE1_MODE" = check ]; then
        [ -f "$ROOT/$dataset/meta.json" ] || MISSING+=("dataset $ROOT/$dataset/meta.json")
        [ "$dino" = none ] || NEEDS_DINO=1
        return
    fi
    echo "==> training $name on $dataset -> $CKPTS/trained_on_${dataset}_${name}"
    $RUNNER "$PY" train.py --model_name "$name" --dataset "$dataset" "${TRAIN_DEVICE[@]}" "${flags[@]}" \
        --datasets_root_dir "$ROOT" --save_path "$CKPTS" --clip_weights "$CLIP" "${extra[@]}" --seed "$SEED" --resume
}

published_reproduce_sh() {
    # Crane (without D-Attn)
    local name="${NAME}_crane"
    train "$name" mvtec --features_list 6 12 18 24 --dino_model none --why "Evaluation purpose"
    train "$name" visa --features_list 6 12 18 24 --dino_model none --why "Evaluation purpose"
    local crane=(--epoch 5 --dino_model none --soft_mean True --features_list 6 12 18 24)
    evaluate crane "trained_on_visa_$name" "mvtec" "${crane[@]}"
    evaluate crane "trained_on_mvtec_$name" "visa mpdd sdd btad dtd dagm" "${crane[@]}"
    evaluate crane "trained_on_mvtec_$name" "$MEDICALS" "${crane[@]}"
    # Crane+
    name="${NAME}_cranep"
    train "$name" mvtec --features_list 24 --dattn_batch_mean True --why "Evaluation purpose"
    train "$name" visa --features_list 24 --dattn_batch_mean True --why "Evaluation purpose"
    local cranep=(--epoch 5 --dino_model dinov2 --soft_mean True --features_list 24 --dattn_batch_mean True)
    evaluate cranep "trained_on_visa_$name" "mvtec" "${cranep[@]}"
    evaluate cranep "trained_on_mvtec_$name" "visa mpdd sdd btad dtd" "${cranep[@]}"
    evaluate cranep "trained_on_visa_$name" "dagm" "${cranep[@]}" --soft_mean True
    local medical=(--epoch 1 --dino_model dinov2 --soft_mean True --features_list 24 --dattn_batch_mean True)
    evaluate cranep "trained_on_mvtec_$name" "$MEDICALS" "${medical[@]}"
}

# Which models the selected evaluations use; before anything runs: datasets and weights (the checkpoints
# are what training makes)
TABLE1_MODE=plan published_reproduce_sh
TABLE1_MODE=check published_reproduce_sh
kept=()
for item in "${MISSING[@]}"; do [[ $item == checkpoint\ * ]] || kept+=("$item"); done
MISSING=("${kept[@]}")
table1_check
TABLE1_MODE=run published_reproduce_sh
$RUNNER "$PY" scripts/make_table.py "$RESULTS" --paper
