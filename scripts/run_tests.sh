#!/usr/bin/env bash
# The project's one test command: the whole pytest suite, offline, on CPU.
# Extra arguments go to pytest (e.g. `bash scripts/run_tests.sh -k conformance`).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
    echo "error: .venv is missing; run 'bash setup.sh' first" >&2
    exit 2
fi
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
PYTEST=(.venv/bin/python -m pytest -q)
exec "${PYTEST[@]}" --durations=15 "$@"
