# Shared by test.sh and reproduce.sh (sourced, not run): settings from the environment, the device
# argument, and `evaluate`, which runs test.py for one line of the published scripts. Each script
# calls its sequence of `evaluate` lines twice: first with TABLE1_MODE=check (every checkpoint,
# dataset and weight file is checked before anything runs), then with TABLE1_MODE=run.
# (reproduce.sh first calls it with TABLE1_MODE=plan: `evaluate` only notes the models the selected
# datasets use, in USED_MODELS, so that only those are trained.)
#
# Environment: CRANE_DATASETS (./datasets/data), CHECKPOINTS (checkpoints), RESULTS (per script),
# CLIP_WEIGHTS (openai: the local cache; or a file; or synthetic), DINO_WEIGHTS (the cache; or a
# file; synthetic by default when CLIP_WEIGHTS=synthetic), PYTHON (.venv/bin/python), BATCH_SIZE (8),
# DRY_RUN=1 (check the inputs, then print each command instead of running it).

INDUSTRIAL=(mvtec visa mpdd btad sdd dagm dtd)
MEDICAL=(headct brainmri br35h isic cvc-colondb cvc-clinicdb tn3k)
ALL=("${INDUSTRIAL[@]}" "${MEDICAL[@]}")

die() { echo "$SCRIPT: $*" >&2; exit 2; }

# table1_init DEVICE [DATASET ...]: settings, device flags and the datasets selected (default all 14)
table1_init() {
    DEVICE=$1
    shift
    GIVEN=("$@")
    SELECTED=("$@")
    [ ${#SELECTED[@]} -gt 0 ] || SELECTED=("${ALL[@]}")
    local ds
    for ds in "${SELECTED[@]}"; do
        [[ " ${ALL[*]} " == *" $ds "* ]] || die "unknown dataset '$ds'; choose from: ${ALL[*]}"
    done
    PY=${PYTHON:-.venv/bin/python}
    ROOT=${CRANE_DATASETS:-./datasets/data}
    CKPTS=${CHECKPOINTS:-checkpoints}
    CLIP=${CLIP_WEIGHTS:-openai}
    DINO=${DINO_WEIGHTS:-}
    [ "$CLIP" != synthetic ] || DINO=${DINO:-synthetic}
    BATCH=${BATCH_SIZE:-8}
    [ -x "$PY" ] || die "$PY not found; run 'bash setup.sh' first (or set PYTHON)"
    if [ "$DEVICE" = cpu ]; then
        TEST_DEVICE=(--device cpu)
        TRAIN_DEVICE=(--device cpu)
    elif [[ "$DEVICE" =~ ^[0-9]+(,[0-9]+)*$ ]]; then
        TEST_DEVICE=(--device cuda --devices ${DEVICE//,/ })   # published: --devices $device
        TRAIN_DEVICE=(--device "${DEVICE%%,*}")                 # published: --device $device (one GPU)
    else
        die "DEVICE must be a GPU index (0), a comma-separated list (0,1,2,3) or cpu, got '$DEVICE'"
    fi
    MISSING=()
    USED_MODELS=()
    NEEDS_DINO=0
    RUNNER=
    [ "${DRY_RUN:-0}" = 0 ] || RUNNER=print_command
}

print_command() { printf '%q ' "$@"; echo; }   # DRY_RUN: a command as the shell would read it

selected() { [[ " ${SELECTED[*]} " == *" $1 "* ]]; }

used() { [[ " ${USED_MODELS[*]} " == *" $1 "* ]]; }   # a model some selected evaluation runs

# evaluate METHOD MODEL_NAME "DATASET ..." TEST_FLAG ...: one line of the published script, run for
# the datasets of the list that are selected; results in $RESULTS/METHOD/DATASET/.
evaluate() {
    local method=$1 name=$2 list=$3 epoch=5 vfm=dinov2 ds i
    shift 3
    local flags=("$@")
    for ((i = 0; i + 1 < ${#flags[@]}; i++)); do   # test.py's defaults: --epoch 5, --dino_model dinov2
        [ "${flags[i]}" != --epoch ] || epoch=${flags[i + 1]}
        [ "${flags[i]}" != --dino_model ] || vfm=${flags[i + 1]}
    done
    local checkpoint="$CKPTS/$name/epoch_$epoch.pth" extra=()
    [ "$vfm" = none ] || extra=(${DINO:+--dino_weights "$DINO"})
    for ds in $list; do
        selected "$ds" || continue
        if [ "$TABLE1_MODE" = plan ]; then
            USED_MODELS+=("$name")
            continue
        fi
        if [ "$TABLE1_MODE" = check ]; then
            [ -f "$checkpoint" ] || MISSING+=("checkpoint $checkpoint")
            [ -f "$ROOT/$ds/meta.json" ] || MISSING+=("dataset $ROOT/$ds/meta.json")
            [ "$vfm" = none ] || NEEDS_DINO=1
            continue
        fi
        echo "==> $method on $ds: $checkpoint ${flags[*]}"
        $RUNNER "$PY" test.py "${flags[@]}" --dataset "$ds" --model_name "$name" --visualize False \
            --datasets_root_dir "$ROOT" --checkpoint "$checkpoint" --clip_weights "$CLIP" "${extra[@]}" \
            --image_size 518 --sigma 4 --aupro_method crane --batch_size "$BATCH" \
            --save_path "$RESULTS/$method/$ds" "${TEST_DEVICE[@]}"
    done
}

# table1_check: after the check pass, stop with one message naming everything that is missing
table1_check() {
    # the weights (one line each, no traceback), reported with the missing datasets in one round
    local vfm=none weights
    [ "$NEEDS_DINO" = 0 ] || vfm=dinov2
    weights=$("$PY" -c "import sys; from crane.models.weights import weights_problems as p; print('\n'.join(p(sys.argv[1], sys.argv[2], sys.argv[3] or None)))" "$CLIP" "$vfm" "$DINO" 2>&1) \
        || weights="cannot check the weights: $weights"
    [ -z "$weights" ] || MISSING+=("weights: ${weights//$'\n'/$'\n'  weights: }  (set CLIP_WEIGHTS / DINO_WEIGHTS to files, or CLIP_WEIGHTS=synthetic for a pipeline run)")
    if [[ "$DEVICE" != cpu && "${DRY_RUN:-0}" = 0 ]] && ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
        MISSING+=("device: no GPU (CUDA) here for DEVICE $DEVICE: run 'bash $SCRIPT cpu${GIVEN[*]:+ ${GIVEN[*]}}' instead")
    fi
    if [ ${#MISSING[@]} -gt 0 ]; then
        local unique
        unique=$(printf '  %s\n' "${MISSING[@]}" | sort -u)
        die "missing inputs:
$unique
  datasets: unpack each archive to $ROOT/KEY and run 'python -m datasets.generate KEY $ROOT/KEY'
  (datasets/README.md); set CRANE_DATASETS for another root, or name the datasets to run, e.g.:
  bash $SCRIPT ${SCRIPT_ARGS:-} mvtec visa"
    fi
}
