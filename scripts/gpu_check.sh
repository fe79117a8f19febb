#!/usr/bin/env bash
# GPU acceptance check of the evaluation pipeline (issues 11, 22): Crane and Crane+ on one GPU in at most 5
# minutes, with the lent GPU machine's own python3 (torch 2.11) where there is no .venv.
#
#   bash scripts/gpu_check.sh [OUT_DIR]    (default OUT_DIR: $OUT where it is set, as on the lent machine; else gpu_check/)
#   bash scripts/gpu_check.sh --help       (this text)
#
# First the wheels in .whl/ (git-ignored; `bash scripts/gpu_wheels.sh` makes them: open_clip_torch, ftfy and wcwidth,
# which the machine's image lacks) are installed into a temporary folder put on PYTHONPATH; then
# scripts/gpu_versions.py prints the python, torch, timm, numpy and open_clip versions and the GPUs, and stops the
# check in one line (exit 2) when one is missing or older than crane needs (open_clip 3.3: timm >= 1.0.17), or no GPU
# is seen. Then the steps, each under its own time limit and the overall DEADLINE (a step that cannot finish in the
# time left is SKIPPED, never left running):
#   1. precision        CUDA fp32 against the CPU on random ViT-L/14 weights, Crane and Crane+ at 518 (maps and
#                       scores within 1e-4), and the drift of bf16 / fp16 (scripts/precision_drift.py, 2 images)
#   2. torchrun         test.py under torchrun on one GPU and an NCCL gather check, files equal to a plain python
#                       test.py run; with 2+ GPUs also --devices 0 1 (NCCL gathering) = 1 GPU
#   3. throughput       scripts/bench_throughput.py at 518 with ViT-L/14 widths, Crane and Crane+, bf16: decoding
#                       alone, null model (the pipeline's share), full model (img/s, stage shares, peak GPU memory)
#   4. throughput_fp32  the same, full model in fp32
#   5. training         only with TRAINING=1: train.py, 2 epochs with --feature_cache memory and off, a bf16 epoch
#   6. compile          only with COMPILE=1: the full Crane model in bf16 through torch.compile
# Data and weights are generated on the fly (random weights, shipped prompt checkpoints) in a temporary folder,
# removed at the end; nothing is downloaded. OUT_DIR gets figures.md, a log per step and the JSON of steps 1, 3
# and 4: 8 files (the lent machine returns at most 8 from $OUT).
# Exit status: 0 every step passed; 1 a step failed, timed out or was skipped; 2 nothing was run (no GPU, a
# package missing or too old, the wheels did not install, a bad argument).
#
# Environment: PYTHON (default .venv/bin/python, else python3); DEADLINE: seconds for the whole check, wheels and
# version check included (default 280; give more with TRAINING=1 or COMPILE=1); BENCH_IMAGES (default 256);
# GPU_CHECK_DEVICE=cpu runs every step on the CPU at toy sizes (to test this script without a GPU; its DEADLINE is
# 900 s and each step's limit three times the GPU's).
set -uo pipefail
START=$SECONDS
case "${1:-}" in
    -h|--help) awk 'NR > 1 && /^#/ {sub(/^# ?/, ""); print; next} NR > 1 {exit}' "$0"; exit 0 ;;
    -*) echo "gpu_check.sh: unknown option $1 (usage: bash scripts/gpu_check.sh [OUT_DIR] | --help)" >&2; exit 2 ;;
esac
cd "$(dirname "$0")/.."
REPO=$PWD
PY=${PYTHON:-}
if [ -z "$PY" ]; then
    if [ -x .venv/bin/python ]; then PY=$REPO/.venv/bin/python; else PY=python3; fi
fi
OUT_DIR=${1:-${OUT:-gpu_check}}
DEVICE=${GPU_CHECK_DEVICE:-cuda}
if [ "$DEVICE" = cuda ]; then
    # full sizes: ViT-L/14 widths at 518; the whole check in at most 5 minutes
    DEADLINE=${DEADLINE:-280}; SLOW=1
    SIZE=518; WIDTH=1024; DRIFT_IMAGES=2; BENCH_IMAGES=${BENCH_IMAGES:-256}; BATCH=32; SOURCE=1024
    TINY_SIZE=518; NPROC_TORCHRUN=1; PRECISIONS="fp32 bf16 fp16"; TRAIN_BF16=bf16
elif [ "$DEVICE" = cpu ]; then
    # toy sizes; a shared CPU is slow at starting processes: three times the time limits
    DEADLINE=${DEADLINE:-900}; SLOW=3
    SIZE=56; WIDTH=64; DRIFT_IMAGES=2; BENCH_IMAGES=${BENCH_IMAGES:-8}; BATCH=4; SOURCE=128
    TINY_SIZE=56; NPROC_TORCHRUN=2; PRECISIONS="bf16"; TRAIN_BF16=bf16
else
    echo "gpu_check.sh: GPU_CHECK_DEVICE must be cuda or cpu, got $DEVICE" >&2
    exit 2
fi
mkdir -p "$OUT_DIR" || exit 2
OUT_DIR=$(cd "$OUT_DIR" && pwd)
FIG=$OUT_DIR/figures.md
# everything else (generated data, results, the carried wheels' install) lives in temporary folders
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX") || exit 2
SITE=$WORK/site
DATA=$WORK/data
trap 'rm -rf "$WORK"' EXIT
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 PYTHONPATH=$REPO${PYTHONPATH:+:$PYTHONPATH}

shopt -s nullglob
WHEELS=(.whl/*.whl)
shopt -u nullglob
if [ ${#WHEELS[@]} -gt 0 ]; then
    echo "installing ${#WHEELS[@]} carried wheel(s) from .whl/ into $SITE"
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "${WHEELS[@]}" ||
        { echo "gpu_check.sh: the wheels in .whl/ did not install with $PY (pip's message above); nothing was run" >&2
          exit 2; }
    PYTHONPATH=$PYTHONPATH:$SITE
fi

# versions first: stops here (exit 2, one line) on a missing or too old package, or no GPU
"$PY" scripts/gpu_versions.py --device "$DEVICE" | tee "$WORK/versions" || exit 2
NGPU=0
[ "$DEVICE" = cuda ] && NGPU=$(sed -n 's/^torch CUDA .*, \([0-9][0-9]*\) GPU(s)$/\1/p' "$WORK/versions")
: "${NGPU:=0}"
export PY OUT_DIR WORK DATA DEVICE NGPU SIZE WIDTH BENCH_IMAGES BATCH SOURCE TINY_SIZE NPROC_TORCHRUN TRAIN_BF16
# CPU runs compare files byte for byte only at equal thread counts (one per process, as under torchrun)
[ "$DEVICE" = cpu ] && export OMP_NUM_THREADS=1
STATUS=()

SETUP="device $DEVICE, $PY, commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
echo "$SETUP"
{
    echo "# gpu_check $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo
    echo '```'
    cat "$WORK/versions"
    echo "$SETUP"
    echo '```'
} > "$FIG"

left() { echo $((DEADLINE - (SECONDS - START))); }

# step NAME LIMIT COMMAND...: run COMMAND (its output in OUT_DIR/NAME.log) under min(LIMIT x SLOW, time left).
step() {
    local name=$1 limit=$2 t0=$SECONDS rc
    shift 2
    local remaining
    remaining=$(left)
    if [ "$remaining" -lt 30 ]; then
        STATUS+=("SKIP  $name (no time left under the ${DEADLINE}s deadline)")
        echo "=== $name: SKIPPED (no time left)"
        return 1
    fi
    limit=$((limit * SLOW))
    [ "$limit" -gt "$remaining" ] && limit=$remaining
    echo "=== $name (limit ${limit}s)"
    # a new bash runs the step (the shell functions below are exported); timeout stops its whole process group
    timeout --kill-after=15 "$limit" bash -c '"$@"' step "$@" > "$OUT_DIR/$name.log" 2>&1
    rc=$?
    local took=$((SECONDS - t0))
    if [ $rc -eq 0 ]; then
        STATUS+=("PASS  $name (${took}s)")
    elif [ $rc -eq 124 ] || [ $rc -eq 137 ]; then
        STATUS+=("FAIL  $name (timed out after ${limit}s)")
    else
        STATUS+=("FAIL  $name (exit $rc, ${took}s; see $OUT_DIR/$name.log)")
    fi
    [ $rc -ne 0 ] && tail -n 15 "$OUT_DIR/$name.log" | sed 's/^/    /'
    return $rc
}

# figures TITLE LOG: append to the figures file the last report of LOG (from its last "N images of/at" line
# on: the table of bench_throughput.py or precision_drift.py) and its "max ..." / "seconds ..." lines.
figures() {
    { echo; echo "## $1"; echo
      [ -f "$2" ] || { echo "(not run)"; return; }
      grep -E '^(max|seconds) ' "$2"
      awk '/^[0-9]+ images (of|at) /{report = ""; keep = 1} keep {report = report $0 "\n"} END {printf "%s", report}' "$2"
    } >> "$FIG"
}

# ----------------------------------------------------------------------------- 1. precision
step precision 100 "$PY" scripts/precision_drift.py --device "$DEVICE" --reference_device cpu \
    --precisions $PRECISIONS --variants crane cranep --images "$DRIFT_IMAGES" --image_size "$SIZE" --batch_size 2 \
    --vision_width "$WIDTH" --fp32_tolerance 1e-4 --output "$OUT_DIR/precision.json"
figures "1. precision: $DEVICE against CPU fp32 (random ViT weights, $DRIFT_IMAGES images at $SIZE)" "$OUT_DIR/precision.log"

# ------------------------------------------------------------------------------ 2. torchrun
tiny_data() {
    [ -f "$DATA/tiny/meta.json" ] || "$PY" -m datasets.synthetic "$DATA/tiny" --classes 2 --train 0 --test-normal 3 \
        --test-anomalous 3 --size 256 --overwrite
}
same_files() {  # same_files DIR_A DIR_B: the result files and maps are byte for byte equal
    local a=$1 b=$2 f
    for f in metrics.json predictions.csv; do cmp "$a/$f" "$b/$f" || return 1; done
    diff -rq "$a/maps" "$b/maps"
}
torchrun_check() {
    set -e
    tiny_data
    local args=(--dataset tiny --datasets_root_dir "$DATA" --model_name trained_on_mvtec_crane --clip_weights synthetic
                --image_size "$TINY_SIZE" --device "$DEVICE" --batch_size 2 --save_maps)
    "$PY" test.py "${args[@]}" --save_path "$WORK/tr_plain"
    "$PY" -m torch.distributed.run --standalone --nproc_per_node="$NPROC_TORCHRUN" test.py "${args[@]}" \
        --save_path "$WORK/tr_torchrun"
    same_files "$WORK/tr_plain" "$WORK/tr_torchrun"
    echo "max torchrun ($NPROC_TORCHRUN process(es)) files = plain python files"
    cat > "$WORK/nccl_check.py" <<'EOF'
import os, torch, torch.distributed as dist
backend = "nccl" if torch.cuda.is_available() else "gloo"
dist.init_process_group(backend)
rank, world = dist.get_rank(), dist.get_world_size()
device = torch.device("cuda", int(os.environ["LOCAL_RANK"])) if backend == "nccl" else torch.device("cpu")
x = torch.arange(4, dtype=torch.float32, device=device) + rank
out = [torch.empty_like(x) for _ in range(world)] if rank == 0 else None
dist.gather(x, out, dst=0)
if rank == 0:
    assert all(torch.equal(o.cpu(), torch.arange(4.0) + r) for r, o in enumerate(out))
    print(f"max {backend} gather over {world} process(es): ok")
dist.destroy_process_group()
EOF
    "$PY" -m torch.distributed.run --standalone --nproc_per_node="$NPROC_TORCHRUN" "$WORK/nccl_check.py"
    if [ "$NGPU" -ge 2 ]; then
        "$PY" test.py "${args[@]}" --devices 0 1 --save_path "$WORK/tr_two"
        same_files "$WORK/tr_plain" "$WORK/tr_two"
        echo "max 2 GPUs (NCCL gathering) files = 1 GPU files"
    fi
}
export -f tiny_data same_files torchrun_check
step torchrun 90 torchrun_check
figures "2. test.py under torchrun" "$OUT_DIR/torchrun.log"

# ---------------------------------------------------------------------------- 3. throughput
bench() {  # bench NAME ARGS...
    local name=$1
    shift
    "$PY" scripts/bench_throughput.py --device "$DEVICE" --images "$BENCH_IMAGES" --source_size "$SOURCE" \
        --image_size "$SIZE" --vision_width "$WIDTH" --batch_size "$BATCH" --workdir "$WORK/bench" \
        --output "$OUT_DIR/$name.json" "$@"
}
export -f bench
BF16=bf16
[ "$DEVICE" = cpu ] && BF16=fp32  # bf16 on this CPU is slower than fp32; the smoke run only tests the script
step throughput 100 bench throughput --variants crane cranep --models null full --precision "$BF16"
figures "3. throughput at $SIZE, $BENCH_IMAGES images of $SOURCE px, batch $BATCH, $BF16" "$OUT_DIR/throughput.log"

# ---------------------------------------------------------------------------- 4. fp32 speed
step throughput_fp32 80 bench throughput_fp32 --variants crane cranep --models full --no_decode --precision fp32
figures "4. throughput, full model in fp32" "$OUT_DIR/throughput_fp32.log"

# ------------------------------------------------------------------------ 5. training (opt-in)
train_check() {
    set -e
    tiny_data
    local args=(--dataset tiny --datasets_root_dir "$DATA" --clip_weights synthetic --dino_weights synthetic
                --image_size "$TINY_SIZE" --batch_size 4 --device "$DEVICE" --save_path "$WORK/train" --overwrite)
    "$PY" train.py "${args[@]}" --epoch 2 --feature_cache memory --model_name cache
    "$PY" train.py "${args[@]}" --epoch 2 --feature_cache off --model_name nocache
    "$PY" train.py "${args[@]}" --epoch 1 --feature_cache memory --precision "$TRAIN_BF16" --model_name bf16
    "$PY" - "$WORK/train" <<'EOF'
import csv, math, sys
from pathlib import Path
import torch
runs = Path(sys.argv[1])
logs = {name: list(csv.DictReader(open(runs / f"trained_on_tiny_{name}" / "log.csv"))) for name in ("cache", "nocache", "bf16")}
for name, rows in logs.items():
    print(f"seconds {name}: " + ", ".join(f"epoch {r['epoch']} {float(r['seconds']):.2f} s (encoding "
                                          f"{float(r['encode_seconds']):.2f} s), loss {r['loss']}" for r in rows))
    assert all(math.isfinite(float(r["loss"])) for r in rows), name
a = torch.load(runs / "trained_on_tiny_cache" / "epoch_2.pth", weights_only=True)["prompt_learner"]
b = torch.load(runs / "trained_on_tiny_nocache" / "epoch_2.pth", weights_only=True)["prompt_learner"]
print(f"max |prompts with cache - without| after 2 epochs: {max(float((a[k] - b[k]).abs().max()) for k in a):.3g}")
first = [float(logs[n][0]["loss"]) for n in ("cache", "nocache")]
assert abs(first[0] - first[1]) <= 1e-4 * max(1.0, abs(first[1])), f"epoch-1 losses differ: {first}"
EOF
}
export -f train_check
if [ "${TRAINING:-0}" = 1 ]; then
    step training 120 train_check
    figures "5. training (2 epochs, 12 images at $TINY_SIZE, random CLIP/DINOv2, Crane+ defaults)" "$OUT_DIR/training.log"
fi

# ------------------------------------------------------------------------- 6. compile (opt-in)
if [ "${COMPILE:-0}" = 1 ]; then
    step throughput_compile 200 bench throughput_compile --variants crane --models full --no_decode \
        --precision "$BF16" --compile
    figures "6. throughput, full model, $BF16, --compile" "$OUT_DIR/throughput_compile.log"
fi

# -------------------------------------------------------------------------------- summary
failed=0
{
    echo
    echo "## Summary ($((SECONDS - START)) s)"
    echo
    for line in "${STATUS[@]}"; do
        echo "    $line"
    done
} >> "$FIG"
for line in "${STATUS[@]}"; do
    case $line in FAIL*) failed=1 ;; SKIP*) [ $failed -eq 0 ] && failed=2 ;; esac
done
verdict=(PASS FAIL "INCOMPLETE (steps skipped)")
echo
echo "gpu_check: $((SECONDS - START)) s; figures in $FIG"
for line in "${STATUS[@]}"; do echo "  $line"; done
echo "gpu_check: ${verdict[$failed]}" | tee -a "$FIG"
[ $failed -eq 0 ]
