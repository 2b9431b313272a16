#!/usr/bin/env bash
# Set up from nothing (.venv + xentlab with its test extras), then run the whole test suite.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -k registry`.
source "$(dirname "$0")/_setup.sh" "dev,sweep,gpu,mnist"
python -m pytest "$@"
