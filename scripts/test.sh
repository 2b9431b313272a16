#!/usr/bin/env bash
# Set up from nothing (.venv + xentlab with its test extras), then run the whole test suite.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -k registry`.
# The `gpu` extra (Triton) even without a GPU: tests/test_triton.py runs the Triton kernels in Triton's CPU
# interpreter (TRITON_INTERPRET=1, tests/conftest.py), so their correctness is checked on every machine.
# tables, wandb and mlflow: the tests read Parquet and write each optional logger's files offline.
source "$(dirname "$0")/_setup.sh" "dev,sweep,gpu,mnist,tables,wandb,mlflow"
# tests/test_slurm.py starts a one-node SLURM cluster, and the browser tests open pages in headless
# Chromium: as root on Debian, install SLURM, munge and Chromium if missing (elsewhere those tests skip,
# saying why). Quiet and idempotent; a failed install is one line.
if [ "$(id -u)" = 0 ] && [ -f /etc/debian_version ] && command -v apt-get >/dev/null \
        && ! { command -v slurmctld && command -v munged && command -v chromium; } >/dev/null 2>&1; then
    export DEBIAN_FRONTEND=noninteractive
    PACKAGES="slurm-wlm munge chromium"
    if ! { apt-get install -y -qq $PACKAGES || { apt-get update -qq && apt-get install -y -qq $PACKAGES; }; } \
            >/tmp/xentlab-apt-install.log 2>&1; then
        echo "scripts/test.sh: could not install $PACKAGES (see /tmp/xentlab-apt-install.log)" >&2
    fi
fi
python -m pytest "$@"
