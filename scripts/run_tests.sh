#!/usr/bin/env bash
# The project's one test command: the whole pytest suite, offline, on CPU.
# Extra arguments go to one pytest run instead (e.g. `bash scripts/run_tests.sh -k conformance`).
#
# The tests that load onnxruntime / OpenVINO (marker `runtimes`: export, deploy) run in a pytest
# process of their own, after the others: with those native runtimes loaded next to torch, a later
# test in the same process could crash (a rare segmentation fault seen on this CPU machine).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
    echo "error: .venv is missing; run 'bash setup.sh' first" >&2
    exit 2
fi
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
PYTEST=(.venv/bin/python -m pytest -q)
if [ $# -gt 0 ]; then
    exec "${PYTEST[@]}" --durations=15 "$@"
fi
"${PYTEST[@]}" --durations=15 -m "not runtimes" --ignore=tests/test_export.py --ignore=tests/test_deploy.py
"${PYTEST[@]}" --durations=5 -m runtimes
