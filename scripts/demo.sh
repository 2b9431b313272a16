#!/usr/bin/env bash
# Set up from nothing, then the main job: train six losses over ten seeds on the default imbalanced dataset
# (conf/experiment/compare_losses.yaml; a Hydra multirun, jobs in parallel), log to TensorBoard and print
# the comparison report.
# Extra arguments are Hydra overrides, e.g. `bash scripts/demo.sh data.imbalance_ratio=100`.
# The sweep launchers and Optuna, and the MNIST subset of the README's tour; Triton only where CUDA is
# (scripts/_setup.sh).
source "$(dirname "$0")/_setup.sh" "sweep,mnist"
xentlab-train -m experiment=compare_losses hydra/launcher=joblib "$@"
SWEEP="$(ls -dt outputs/multirun/*/* | head -n 1)"
echo
echo "Sweep folder: $SWEEP (report.md, report.csv, plots)"
echo "Open the curves:  .venv/bin/tensorboard --logdir $SWEEP"
