#!/usr/bin/env bash
# Screenshots of TensorBoard's Time Series, Custom Scalars and HParams views for docs/img/, from a real
# 3-loss x 5-seed sweep, taken by headless Chromium.
#   bash scripts/screenshots.sh            (needs Debian's `chromium`: apt-get install -y chromium)
# Time Series shows the per-setting summary runs (`summary/<setting>`: the mean over seeds), Custom
# Scalars their Margin charts (mean and 95% interval), HParams every run with the headline metrics
# first. tests/test_tensorboard.py takes the same views of a smaller sweep. The sweep (~2 min on two
# cores) and TensorBoard stay on this machine: TensorBoard listens on 127.0.0.1 only and Chromium runs
# with its network features off. SWEEP=<dir> reuses a sweep folder instead of training one.
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

sweep=${SWEEP:-}
if [ -z "$sweep" ]; then
    sweep="$work/sweep"
    "$VENV/bin/xentlab-train" -m loss=ce,focal,logit_adjusted seeds=5 data.n_samples=3000 \
        data.imbalance_ratio=20 trainer.max_epochs=15 hydra/launcher=joblib \
        "hydra.sweep.dir=$sweep" '~hydra.callbacks.report' > "$work/sweep.log" 2>&1 \
        || { tail -30 "$work/sweep.log" >&2; exit 1; }
fi

port=$("$VENV/bin/python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
"$VENV/bin/tensorboard" --logdir "$sweep" --host 127.0.0.1 --port "$port" > "$work/tb.log" 2>&1 &
tb_pid=$!
for _ in $(seq 120); do
    curl -sf "http://127.0.0.1:$port/data/plugin/scalars/tags" | grep -q 'summary/' && break
    sleep 0.5
done

mkdir -p "$OUT"
shoot() {  # shoot <file> <url path and fragment> <width,height>
    "$BROWSER" --headless --no-sandbox --disable-gpu --disable-quic --no-first-run \
        --disable-background-networking --disable-component-update --disable-sync \
        --user-data-dir="$work/profile-$1" --hide-scrollbars --virtual-time-budget=30000 \
        --window-size="$3" --screenshot="$OUT/$1" "http://127.0.0.1:$port/$2" > "$work/chromium.log" 2>&1
    echo "wrote $OUT/$1"
}
# Time Series and Custom Scalars list only the summary runs (their run filters), HParams every run.
shoot tensorboard_scalars.png "?forceSVG=true&runFilter=summary%2F#timeseries" 1600,680
shoot tensorboard_custom_scalars.png "#custom_scalars&regexInput=summary%2F" 1600,760
shoot tensorboard_hparams.png "#hparams" 2000,700
