"""The long-tail and noisy-label experiments compose into the runs their comments describe."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from xentlab.train import CONFIG_DIR

METHODS = sorted(p.stem for p in Path(CONFIG_DIR, "method").glob("*.yaml"))


def composed(overrides: list[str]):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose(config_name="config", overrides=overrides, return_hydra_config=True)


def test_long_tail_sweeps_every_method_on_long_tailed_mnist_with_the_ldam_drw_schedule():
    cfg = composed(["experiment=long_tail"])
    swept = cfg.hydra.sweeper.params
    assert sorted(swept["+method"].split(",")) == METHODS and len(swept["seed"].split(",")) >= 5
    assert (cfg.data.name, cfg.data.imbalance_ratio, cfg.data.eval_split) == ("mnist", 50, "balanced")
    assert (cfg.model.name, cfg.scheduler.name) == ("cnn", "step") and cfg.scheduler.warmup_epochs > 0
    assert cfg.report.baseline == "method=ce" and cfg.objective.startswith("val/")


@pytest.mark.parametrize(("method", "expected"), [
    ("ce", {"loss.name": "ce", "model.head": "linear", "data.sampler": "instance"}),
    ("weighted_ce", {"loss.name": "weighted_ce", "loss.weights": "effective_number"}),
    ("focal", {"loss.name": "focal", "loss.alpha": "effective_number"}),
    ("logit_adjusted", {"loss.name": "logit_adjusted"}),
    ("balanced_softmax", {"loss.name": "logit_adjusted", "loss.tau": 1.0}),
    # DRW starts at the schedule's first learning-rate decay, as in the paper.
    ("ldam_drw", {"loss.name": "ldam", "model.head": "cosine", "loss.drw_epoch": 20}),
    ("ce_resampled", {"loss.name": "ce", "data.sampler": "class_balanced", "model.head": "linear"}),
])
def test_each_method_sets_its_loss_and_the_settings_its_paper_pairs_with_it(method, expected):
    cfg = composed(["experiment=long_tail", f"+method={method}"])
    for key, value in expected.items():
        assert OmegaConf.select(cfg, key) == value, key
    assert cfg.scheduler.name == "step" and cfg.data.name == "mnist"  # the shared protocol stays


def test_noisy_labels_sweeps_robust_losses_over_noise_levels():
    cfg = composed(["experiment=noisy_labels"])
    swept = cfg.hydra.sweeper.params
    assert swept["loss"].split(",") == ["ce", "gce", "poly1", "label_smoothing"]
    assert [float(v) for v in swept["data.label_noise"].split(",")] == [0.0, 0.2, 0.4]
    assert cfg.data.imbalance_ratio == 1 and cfg.report.baseline == "loss=ce"


def test_the_evaluation_experiments_have_the_power_their_questions_need():
    imbalance = composed(["experiment=imbalance_sweep"])
    swept = imbalance.hydra.sweeper.params
    assert {"ce", "weighted_ce", "logit_adjusted"} <= set(swept["loss"].split(","))
    # Ten seeds per job, trained as one seed batch (seeds 0-9), rather than a swept seed.
    assert swept["data.imbalance_ratio"].split(",") == ["1", "10", "100"] and imbalance.seeds == 10
    assert "seed" not in swept and imbalance.seed == 0
    assert imbalance.data.eval_split == "balanced"  # hundreds of test samples in the rarest class
    calibration = composed(["experiment=calibration"])
    assert calibration.seeds == 10 and "seed" not in calibration.hydra.sweeper.params
    ce_vs_mse = composed(["experiment=ce_vs_mse"])
    assert ce_vs_mse.optimizer._target_ == "torch.optim.SGD"  # Adam would hide MSE's small gradients
    assert ce_vs_mse.hydra.sweeper.params["loss"] == "ce,mse" and ce_vs_mse.seeds == 10
    for cfg in (imbalance, calibration, ce_vs_mse, composed(["experiment=tune_focal"]), composed([])):
        assert cfg.objective.startswith("val/")  # tuned on validation, never on test


def test_tuned_tunes_every_loss_on_its_own_grid_and_reports_fresh_seeds():
    from xentlab.lab.tuning import candidates, grid_of, tuning_seeds

    for loss, size in (("ce", 3), ("weighted_ce", 3), ("focal", 9), ("logit_adjusted", 9)):
        cfg = composed(["experiment=tuned", f"loss={loss}"])
        assert len(candidates(grid_of(cfg))) == size, loss
        assert set(tuning_seeds(cfg)).isdisjoint(range(cfg.seed, cfg.seed + cfg.seeds))
    swept = composed(["experiment=tuned"]).hydra.sweeper.params["loss"]
    assert swept == "ce,weighted_ce,focal,logit_adjusted"
    assert grid_of(composed(["loss=focal"])) == {}  # tune=none: one recipe, as before
