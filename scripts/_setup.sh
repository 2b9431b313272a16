# Sourced by demo.sh and test.sh: create .venv if missing and install xentlab into it with the extras the
# caller names ($1), plus the `gpu` extra (Triton, ~1 GB) only where it can run: a machine whose
# `nvidia-smi` lists a GPU, or when asked with XENTLAB_GPU=1 (XENTLAB_GPU=0: never). XENTLAB_EXTRAS
# replaces the whole list (e.g. XENTLAB_EXTRAS=dev,sweep,gpu,mnist).
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
EXTRAS="${1:-dev,sweep}"
case "${XENTLAB_GPU:-auto}" in
    1) EXTRAS="$EXTRAS,gpu" ;;
    auto) if nvidia-smi -L >/dev/null 2>&1; then EXTRAS="$EXTRAS,gpu"; fi ;;
esac
EXTRAS="${XENTLAB_EXTRAS:-$EXTRAS}"
# Install when pyproject.toml changed or an extra asked for is not installed yet; the extras installed
# before are kept (a venv set up by test.sh serves demo.sh as it is).
INSTALLED="$(cat "$STAMP" 2>/dev/null || true)"
missing=""
for extra in ${EXTRAS//,/ }; do
    case ",$INSTALLED," in *",$extra,"*) ;; *) missing="$missing,$extra" ;; esac
done
EXTRAS="${INSTALLED:+$INSTALLED}${missing}"
EXTRAS="${EXTRAS#,}"
if [ ! -f "$STAMP" ] || [ pyproject.toml -nt "$STAMP" ] || [ -n "$missing" ]; then
    python -m pip install -q --upgrade pip
    TORCH_REQ="${XENTLAB_TORCH:-torch==2.13.0}"
    # torch first, pinned: a loose range would pull a multi-GB CUDA build.
    if [ "$TORCH_REQ" != "skip" ]; then
        python -m pip install -q "$TORCH_REQ"
    fi
    python -m pip install -q -e ".[${EXTRAS}]"
    echo "$EXTRAS" > "$STAMP"
fi
