# Sourced by demo.sh and test.sh: create .venv if missing and install xentlab into it.
# XENTLAB_TORCH overrides the torch requirement (e.g. XENTLAB_TORCH=skip to keep your own torch).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
# shellcheck disable=SC1091
. .venv/bin/activate
STAMP=".venv/.xentlab-installed"
EXTRAS="${1:-dev,sweep,gpu}"
if [ ! -f "$STAMP" ] || [ pyproject.toml -nt "$STAMP" ] || [ "$(cat "$STAMP")" != "$EXTRAS" ]; then
    python -m pip install -q --upgrade pip
    TORCH_REQ="${XENTLAB_TORCH:-torch==2.13.0}"
    # torch first, pinned: a loose range would pull a multi-GB CUDA build.
    if [ "$TORCH_REQ" != "skip" ]; then
        python -m pip install -q "$TORCH_REQ"
    fi
    python -m pip install -q -e ".[${EXTRAS}]"
    echo "$EXTRAS" > "$STAMP"
fi
