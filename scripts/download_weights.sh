#!/usr/bin/env bash
# Fetch the pretrained weights Crane needs into the places the code looks, and check them.
# Run `bash scripts/download_weights.sh --help` for the options; checkpoints/README.md has the details.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3

OPENAI_SHA=3035c92b350959924f9f00213499208652fc7ea050643e8b385c2dac08641f02
OPENAI_URL="https://openaipublic.azureedge.net/clip/models/$OPENAI_SHA/ViT-L-14-336px.pt"
CLIP_REPO=timm/vit_large_patch14_clip_336.openai
CLIP_FILES=(open_clip_model.safetensors open_clip_pytorch_model.bin)
DINOV2_URL=https://dl.fbaipublicfiles.com/dinov2/dinov2_vitb14/dinov2_vitb14_reg4_pretrain.pth
SAM_URL=https://dl.fbaipublicfiles.com/segment_anything/sam_vit_b_01ec64.pth
# The 20 official checkpoints ship in checkpoints/ (SHA256SUMS there lists them); "crane" restores a
# missing or damaged one from the official repository itself.
CRANE_SUMS=checkpoints/SHA256SUMS
CRANE_RAW=https://github.com/AlirezaSalehy/Crane/raw/main/checkpoints

CACHE=${XDG_CACHE_HOME:-$HOME/.cache}
TORCH_CKPT_DIR="${TORCH_HOME:-$CACHE/torch}/hub/checkpoints"   # torch.hub.get_dir()/checkpoints
HF_CACHE=${HF_HUB_CACHE:-${HF_HOME:-$CACHE/huggingface}/hub}
OPENAI_FILE="$HOME/.cache/clip/ViT-L-14-336px.pt"

usage() {
    cat <<EOF
Usage: bash scripts/download_weights.sh [OPTIONS] [clip] [dinov2] [sam] [crane]

Fetches the pretrained weights (default: all four) and verifies them:
  clip    OpenAI CLIP ViT-L/14@336px, from the Hugging Face hub ($CLIP_REPO)
          into the HF cache ($HF_CACHE), SHA-256 checked against the hub's record;
          with --clip-source openai: OpenAI's ViT-L-14-336px.pt into $OPENAI_FILE,
          SHA-256 $OPENAI_SHA
  dinov2  Meta's DINOv2 ViT-B/14 with registers (Crane+), dinov2_vitb14_reg4_pretrain.pth,
          into $TORCH_CKPT_DIR/
  sam     Meta's SAM ViT-B image encoder, sam_vit_b_01ec64.pth, into the same folder
  crane   the 20 official prompt-learner checkpoints,
          CHECKPOINTS_DIR/trained_on_{mvtec,visa}_{crane,cranep}/epoch_{1..5}.pth. They ship
          with this repository; any that is missing or fails its sum (checkpoints/SHA256SUMS)
          is fetched again from the official repository ($CRANE_RAW).

Options:
  --dry-run              print what would be fetched from where to where; touch nothing
  --verify               only check the files already in place (no network)
  --manual               print how to place every file by hand (offline machines) and exit
  --clip-source hf|openai  where CLIP comes from (default: hf)
  --checkpoints-dir DIR  where the Crane checkpoints go (default: checkpoints)
  -h, --help             this text

Environment: PYTHON (default .venv/bin/python), TORCH_HOME, HF_HOME / HF_HUB_CACHE, XDG_CACHE_HOME.
Offline, the script stops within seconds and prints where to put which file (same as --manual).
Exit status: 0 everything requested is in place and verified, 1 something is missing or wrong,
2 bad arguments.
EOF
}

manual() {
    cat <<EOF
Placing the weights by hand (download on any machine with internet, then copy):

  CLIP ViT-L/14@336px (always needed), either
    * OpenAI's file   $OPENAI_URL
      -> $OPENAI_FILE   (SHA-256 $OPENAI_SHA)
      or anywhere, then pass --clip_weights /path/to/ViT-L-14-336px.pt
    * or the Hugging Face cache folder models--${CLIP_REPO//\//--} (from a machine where
      'bash scripts/download_weights.sh clip' ran) copied into $HF_CACHE/

  DINOv2 ViT-B/14 reg4 (Crane+, --dino_model dinov2)
    $DINOV2_URL
    -> $TORCH_CKPT_DIR/dinov2_vitb14_reg4_pretrain.pth   (or pass --dino_weights FILE)

  SAM ViT-B (--dino_model sam)
    $SAM_URL
    -> $TORCH_CKPT_DIR/sam_vit_b_01ec64.pth   (or pass --dino_weights FILE)

  Crane checkpoints: shipped with this repository (a fresh clone has all 20, sums in $CRANE_SUMS).
  A lost one comes from the official repository, epochs N = 1..5:
    $CRANE_RAW/trained_on_mvtec_crane/epoch_N.pth  -> $CKPT_DIR/trained_on_mvtec_crane/epoch_N.pth
    $CRANE_RAW/trained_on_mvtec_cranep/epoch_N.pth -> $CKPT_DIR/trained_on_mvtec_cranep/epoch_N.pth
    $CRANE_RAW/trained_on_visa_crane/epoch_N.pth   -> $CKPT_DIR/trained_on_visa_crane/epoch_N.pth
    $CRANE_RAW/trained_on_visa_cranep/epoch_N.pth  -> $CKPT_DIR/trained_on_visa_cranep/epoch_N.pth
  Then check with: bash scripts/download_weights.sh --verify
EOF
}

DRY=0; VERIFY=0; SHOW_MANUAL=0; CLIP_SOURCE=hf; CKPT_DIR=checkpoints; WHAT=()
die_usage() { echo "download_weights.sh: $*; see --help" >&2; exit 2; }
while [ $# -gt 0 ]; do
    case $1 in
        -h|--help) usage; exit 0 ;;
        --dry-run) DRY=1 ;;
        --verify) VERIFY=1 ;;
        --manual) SHOW_MANUAL=1 ;;
        --clip-source) [ $# -ge 2 ] || die_usage "--clip-source needs hf or openai"; CLIP_SOURCE=$2; shift ;;
        --checkpoints-dir) [ $# -ge 2 ] || die_usage "--checkpoints-dir needs a folder"; CKPT_DIR=$2; shift ;;
        clip|dinov2|sam|crane) WHAT+=("$1") ;;
        *) die_usage "unknown argument '$1' (items: clip dinov2 sam crane)" ;;
    esac
    shift
done
case $CLIP_SOURCE in hf|openai) ;; *) die_usage "--clip-source must be hf or openai, got '$CLIP_SOURCE'" ;; esac
[ $((DRY + VERIFY)) -le 1 ] || die_usage "--dry-run and --verify exclude each other"
[ ${#WHAT[@]} -gt 0 ] || WHAT=(clip dinov2 sam crane)
if [ "$SHOW_MANUAL" = 1 ]; then manual; exit 0; fi

wants() { local w; for w in "${WHAT[@]}"; do [ "$w" = "$1" ] && return 0; done; return 1; }
say() { printf '%s\n' "$*"; }

sha256_of() {
    "$PY" -c 'import hashlib, sys
h = hashlib.sha256()
with open(sys.argv[1], "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
        h.update(block)
print(h.hexdigest())' "$1"
}

# check_file NAME FILE [SHA]: print the status line; return 1 when missing or wrong.
FAILED=0; OFFLINE=0
check_file() {
    local name=$1 file=$2 want=${3:-}
    if [ ! -s "$file" ]; then
        say "  MISSING   $name: $file"; FAILED=1; return 1
    fi
    if [ -n "$want" ]; then
        local got; got=$(sha256_of "$file")
        if [ "$got" != "$want" ]; then
            say "  BAD SUM   $name: $file has SHA-256 $got, expected $want (corrupt or different file: delete it and fetch again)"
            FAILED=1; return 1
        fi
        say "  ok        $name: $file (SHA-256 verified)"
    else
        say "  ok        $name: $file ($(du -h "$file" | cut -f1), no published SHA-256; sum $(sha256_of "$file"))"
    fi
}

hf_cached_clip() {
    local f hit
    for f in "${CLIP_FILES[@]}"; do
        hit=$(ls "$HF_CACHE/models--${CLIP_REPO//\//--}"/snapshots/*/"$f" 2>/dev/null | head -n 1 || true)
        if [ -n "$hit" ]; then say "$hit"; return 0; fi
    done
    return 1
}

reachable() { curl -sS -o /dev/null --max-time 8 -I "https://$1" 2>/dev/null; }

fetch() {  # fetch URL DEST: download to DEST.part, then rename
    local url=$1 dest=$2
    if [ "$DRY" = 1 ]; then say "  would fetch $url"; say "           -> $dest"; return 0; fi
    mkdir -p "$(dirname "$dest")"
    say "  fetching $url"
    curl -fL --retry 2 --connect-timeout 15 -o "$dest.part" "$url" && mv "$dest.part" "$dest"
}

need_host() {  # need_host HOST ITEM: false (with the manual hint) when offline
    if [ "$DRY" = 1 ] || reachable "$1"; then return 0; fi
    say "  cannot reach $1 (offline?): $2 not fetched"
    FAILED=1; OFFLINE=1
    return 1
}

get_clip() {
    say "[clip] OpenAI CLIP ViT-L/14@336px"
    if [ "$CLIP_SOURCE" = openai ]; then
        [ -s "$OPENAI_FILE" ] || { need_host openaipublic.azureedge.net clip && fetch "$OPENAI_URL" "$OPENAI_FILE"; } || true
        return
    fi
    if hf_cached_clip >/dev/null; then return; fi
    if [ "$DRY" = 1 ]; then say "  would fetch ${CLIP_FILES[0]} of $CLIP_REPO into $HF_CACHE/ (huggingface_hub)"; return; fi
    need_host huggingface.co clip || return 0
    HF_HUB_OFFLINE=0 "$PY" - "$CLIP_REPO" "${CLIP_FILES[@]}" <<'PYEOF' || FAILED=1
import hashlib, re, sys
from huggingface_hub import get_hf_file_metadata, hf_hub_download, hf_hub_url

repo, names = sys.argv[1], sys.argv[2:]
for name in names:
    try:
        path = hf_hub_download(repo, name)
    except Exception as e:  # try the next file name the loader accepts
        print(f"  {name}: {e}")
        continue
    expected = (get_hf_file_metadata(hf_hub_url(repo, name)).etag or "").strip('"')
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            sha.update(block)
    digest = sha.hexdigest()
    if re.fullmatch(r"[0-9a-f]{64}", expected) and digest != expected:
        sys.exit(f"  BAD SUM {path}: SHA-256 {digest}, the hub records {expected}; delete it and run again")
    print(f"  fetched {path} (SHA-256 {digest} matches the hub)")
    sys.exit(0)
sys.exit(f"  could not fetch CLIP from {repo}")
PYEOF
}

get_meta() {  # get_meta ITEM URL FILE
    say "[$1] $3"
    [ -s "$TORCH_CKPT_DIR/$3" ] && return
    need_host dl.fbaipublicfiles.com "$1" || return 0
    fetch "$2" "$TORCH_CKPT_DIR/$3" || { say "  download failed: $2"; FAILED=1; }
}

crane_sums() {  # "SUM REL" lines of the official checkpoints
    grep -E '^[0-9a-f]{64}  ' "$CRANE_SUMS"
}

get_crane() {
    say "[crane] official checkpoints in $CKPT_DIR/"
    local sum rel bad=0
    while read -r sum rel; do
        if [ -s "$CKPT_DIR/$rel" ] && [ "$(sha256_of "$CKPT_DIR/$rel")" = "$sum" ]; then continue; fi
        bad=$((bad + 1))
        need_host github.com crane || return 0
        fetch "$CRANE_RAW/$rel" "$CKPT_DIR/$rel" || { say "  download failed: $CRANE_RAW/$rel"; FAILED=1; }
    done < <(crane_sums)
    [ "$bad" -gt 0 ] || say "  all 20 in place"
}

if [ "$VERIFY" = 0 ]; then
    [ "$DRY" = 1 ] && say "dry run: nothing is downloaded or written"
    wants clip && get_clip
    wants dinov2 && get_meta dinov2 "$DINOV2_URL" dinov2_vitb14_reg4_pretrain.pth
    wants sam && get_meta sam "$SAM_URL" sam_vit_b_01ec64.pth
    wants crane && get_crane
    if [ "$DRY" = 1 ]; then exit 0; fi
    say ""
fi

say "verifying:"
if wants clip; then
    if [ "$CLIP_SOURCE" = openai ] || [ -s "$OPENAI_FILE" ]; then
        check_file clip "$OPENAI_FILE" "$OPENAI_SHA" || true
    elif clip_file=$(hf_cached_clip); then
        check_file clip "$clip_file" || true
    else
        say "  MISSING   clip: neither $OPENAI_FILE nor $CLIP_REPO in $HF_CACHE"; FAILED=1
    fi
fi
wants dinov2 && { check_file dinov2 "$TORCH_CKPT_DIR/dinov2_vitb14_reg4_pretrain.pth" || true; }
wants sam && { check_file sam "$TORCH_CKPT_DIR/sam_vit_b_01ec64.pth" || true; }
if wants crane; then
    while read -r sum rel; do
        check_file "crane $rel" "$CKPT_DIR/$rel" "$sum" || true
    done < <(crane_sums)
fi
if [ "$FAILED" = 1 ]; then
    say ""
    if [ "$OFFLINE" = 1 ]; then manual; else say "some weights are missing or wrong; to place them by hand see --manual"; fi
    exit 1
fi
say "all requested weights are in place"
