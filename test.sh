#!/usr/bin/env bash
# Table 1 of the paper from the 20 official checkpoints shipped in checkpoints/.
#
#   bash test.sh DEVICE [DATASET ...]        (bash test.sh --help: this text)
#
#   DEVICE   a GPU index (0), several GPUs (0,1,2,3: one process per GPU), or cpu
#   DATASET  any of mvtec visa mpdd btad sdd dagm dtd headct brainmri br35h isic cvc-colondb
#            cvc-clinicdb tn3k (default: all 14)
#
# Follows the published test.sh (github.com/AlirezaSalehy/Crane) line for line: the same test.py
# command for each dataset, in the same order, with the same checkpoint, epoch, soft_mean,
# features_list and dino_model. Crane+ runs as the published evaluation did, with the batch-wide
# D-Attn mean over the published batches (--dattn_batch_mean True: 8 consecutive images of
# meta.json order). What test.sh adds: every input is checked before the first run, results go to
# $RESULTS/{crane,cranep}/DATASET/ (default results/table1; re-running resumes finished classes)
# and the table is built at the end ($RESULTS/table1.md, .csv, beside the paper's numbers).
# AUPRO is the published definition (--aupro_method crane).
#
# Offline, to exercise the pipeline: CLIP_WEIGHTS=synthetic bash test.sh cpu mpdd (random weights,
# meaningless numbers). Environment: see scripts/table1.sh.
set -euo pipefail
for arg in "$@"; do   # the comment above is the help
    [[ $arg != -h && $arg != --help ]] || { sed -n '2,/^[^#]/s/^# \{0,1\}//p' "$0"; exit 0; }
done
cd "$(dirname "$0")"
SCRIPT=test.sh
[ $# -ge 1 ] || { echo "usage: bash test.sh DEVICE [DATASET ...]  (DEVICE: GPU index such as 0, a list such as 0,1,2,3, or cpu)" >&2; exit 2; }
SCRIPT_ARGS=$1
source scripts/table1.sh
table1_init "$@"
RESULTS=${RESULTS:-results/table1}

MEDICALS="brainmri headct br35h isic tn3k cvc-colondb cvc-clinicdb"

published_test_sh() {
    # Crane
    local crane=(--epoch 5 --dino_model none --soft_mean True --features_list 6 12 18 24)
    evaluate crane trained_on_visa_crane "mvtec" "${crane[@]}"
    evaluate crane trained_on_mvtec_crane "visa mpdd sdd btad dtd dagm" "${crane[@]}"
    evaluate crane trained_on_mvtec_crane "$MEDICALS" "${crane[@]}"
    # Crane+ (with D-Attn)
    local cranep=(--epoch 5 --dino_model dinov2 --features_list 24 --dattn_batch_mean True)
    evaluate cranep trained_on_visa_cranep "mvtec" "${cranep[@]}"
    evaluate cranep trained_on_mvtec_cranep "visa mpdd sdd btad dtd" "${cranep[@]}"
    evaluate cranep trained_on_mvtec_cranep "dagm" "${cranep[@]}" --soft_mean True
    # medical sets
    local medical=(--epoch 1 --dino_model dinov2 --soft_mean True --features_list 24 --dattn_batch_mean True)
    evaluate cranep trained_on_mvtec_cranep "$MEDICALS" "${medical[@]}"
}

TABLE1_MODE=check published_test_sh
table1_check
TABLE1_MODE=run published_test_sh
$RUNNER "$PY" scripts/make_table.py "$RESULTS" --paper
