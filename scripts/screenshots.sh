#!/usr/bin/env bash
# Screenshots of TensorBoard's Time Series, HParams and Images tabs for docs/img/, from a small real sweep.
#   bash scripts/screenshots.sh            (needs Debian's `chromium`: apt-get install -y chromium)
# Not part of the test suite: tests/test_tensorboard.py checks the same views through TensorBoard's HTTP
# API. The sweep (3 losses x 2 seeds, ~1 min on two cores) and TensorBoard stay on this machine:
# TensorBoard listens on 127.0.0.1 only and Chromium runs with its network features off.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
OUT=${OUT:-docs/img}
BROWSER=${BROWSER:-$(command -v chromium || command -v chromium-browser || true)}
[ -n "$BROWSER" ] || { echo "chromium not found: apt-get install -y chromium" >&2; exit 2; }

work=$(mktemp -d)
tb_pid=""
cleanup() {
    if [ -n "$tb_pid" ]; then kill "$tb_pid" 2>/dev/null || true; wait "$tb_pid" 2>/dev/null || true; fi
    rm -rf "$work"
}
trap cleanup EXIT

"$VENV/bin/xentlab-train" -m loss=ce,focal,weighted_ce seed=0,1 data.n_samples=3000 \
    data.imbalance_ratio=20 trainer.max_epochs=12 hydra/launcher=joblib \
    "hydra.sweep.dir=$work/sweep" '~hydra.callbacks.report' > "$work/sweep.log" 2>&1 \
    || { tail -30 "$work/sweep.log" >&2; exit 1; }

port=$("$VENV/bin/python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
"$VENV/bin/tensorboard" --logdir "$work/sweep" --host 127.0.0.1 --port "$port" > "$work/tb.log" 2>&1 &
tb_pid=$!
for _ in $(seq 120); do
    curl -sf "http://127.0.0.1:$port/data/plugin/scalars/tags" | grep -q 1_val && break
    sleep 0.5
done

mkdir -p "$OUT"
shoot() {  # shoot <file> <url fragment> <width,height>
    "$BROWSER" --headless --no-sandbox --disable-gpu --disable-quic --no-first-run \
        --disable-background-networking --disable-component-update --disable-sync \
        --user-data-dir="$work/profile-$1" --hide-scrollbars --virtual-time-budget=20000 \
        --window-size="$3" --screenshot="$OUT/$1" "http://127.0.0.1:$port/$2" > "$work/chromium.log" 2>&1
    echo "wrote $OUT/$1"
}
shoot tensorboard_scalars.png "#timeseries" 1400,1000
shoot tensorboard_hparams.png "#hparams" 1400,800
shoot tensorboard_images.png "#images" 1400,1000
