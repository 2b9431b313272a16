"""tune=grid: candidates train on tuning seeds only, the best by the validation objective is chosen, the
job's own seeds train with it, and the report names the setting each loss got."""

from __future__ import annotations

import json

import pytest
from hydra import compose, initialize_config_dir

from xentlab.lab.report import build_report
from xentlab.lab.report.tables import tuning_table
from xentlab.lab.run import train
from xentlab.lab.tuning import TUNING_FILE, best_trial, candidates, grid_of, tune
from xentlab.lab.validation import ConfigError, check_config
from xentlab.train import CONFIG_DIR

TINY = ["data.n_samples=600", "model.hidden_sizes=[16]", "trainer.max_epochs=3", "loss=focal", "tune=grid",
        "tune.seeds=2", "seeds=2"]
GRID = ["tune.grid={optimizer.lr: [0.0001, 0.03]}", "tune.loss_grid.focal={loss.gamma: [0.0, 2.0]}"]
ONE_GAMMA = "tune.loss_grid.focal={loss.gamma: [2.0]}"  # 2 candidates: enough to choose, half the training


def config(*overrides):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose("config", overrides=[*TINY, *overrides])


def test_the_grid_is_the_shared_one_times_the_losss_own():
    grid = grid_of(config(*GRID))
    assert grid == {"optimizer.lr": [0.0001, 0.03], "loss.gamma": [0.0, 2.0]}
    assert candidates(grid) == [{"optimizer.lr": 0.0001, "loss.gamma": 0.0},
                                {"optimizer.lr": 0.0001, "loss.gamma": 2.0},
                                {"optimizer.lr": 0.03, "loss.gamma": 0.0},
                                {"optimizer.lr": 0.03, "loss.gamma": 2.0}]
    assert grid_of(config("loss=ce")) == {"optimizer.lr": [0.001, 0.003, 0.01]}  # CE has no parameter


@pytest.mark.parametrize(("override", "message"), [
    ("tune.grid={optimizer.lr: 0.01}", "must be a non-empty list"),
    ("tune.grid={optimizer.momentum: [0.9]}", "not a setting of this run's config"),
    ("objective=test/balanced_accuracy", "must be a val/ metric"),
])
def test_a_bad_grid_is_refused_before_training(override, message):
    with pytest.raises(ConfigError, match=message):
        check_config(config(override))


def test_the_best_mean_wins_in_the_objectives_direction():
    trials = [{"mean": 0.7}, {"mean": None, "scores": [0.9, float("nan")]}, {"mean": 0.8}, {"mean": 0.8}]
    assert best_trial(trials, "val/balanced_accuracy") == 2  # the first of a tie; a failed seed is out
    assert best_trial(trials, "val/ece") == 0
    with pytest.raises(ConfigError, match="every candidate failed"):
        best_trial([{"mean": None, "scores": [float("nan")]}], "val/balanced_accuracy")


@pytest.fixture(scope="module")
def tuned(tmp_path_factory):
    """A job tuned on its grid, then its two fresh seeds trained with the choice."""
    folder = tmp_path_factory.mktemp("tuned")
    cfg = tune(config(*GRID, ONE_GAMMA), folder, say=lambda *a, **k: None)
    return folder, cfg, train(cfg, folder)


def test_tuning_chooses_on_tuning_seeds_and_leaves_no_runs_behind(tuned):
    folder, cfg, records = tuned
    done = json.loads((folder / TUNING_FILE).read_text())
    assert done["tuning_seeds"] == [1000, 1001] and len(done["trials"]) == 2
    means = [t["mean"] for t in done["trials"]]
    assert means == [pytest.approx(sum(t["scores"]) / 2) for t in done["trials"]]
    assert done["chosen"] == means.index(max(means))
    setting = done["trials"][done["chosen"]]["setting"]
    assert (cfg.optimizer.lr, cfg.loss.gamma) == (setting["optimizer.lr"], setting["loss.gamma"])
    assert cfg.tune.result.chosen == [f"optimizer.lr={setting['optimizer.lr']}",
                                      f"loss.gamma={setting['loss.gamma']}"]
    # Only the job's own seeds are runs: the candidates trained elsewhere.
    assert sorted(p.parent.name for p in folder.rglob("metrics.json")) == ["seed=0", "seed=1"]
    assert [r["config"]["seed"] for r in records] == [0, 1]
    assert all(r["config"]["optimizer"]["lr"] == setting["optimizer.lr"] for r in records)


def test_a_resumed_job_reuses_its_tuning(tuned, monkeypatch):
    folder, cfg, _ = tuned

    def no_training(*args, **kwargs):
        raise AssertionError("tuned again")

    monkeypatch.setattr("xentlab.lab.run.train", no_training)
    again = tune(config(*GRID, ONE_GAMMA, "ckpt_path=last"), folder, say=lambda *a, **k: None)
    assert again.tune.result == cfg.tune.result


def test_a_fresh_job_in_a_tuned_runs_folder_is_refused_before_its_candidates_train(tuned, monkeypatch):
    from xentlab.lab.runs import FolderHoldsARun

    folder, _, _ = tuned
    written = (folder / TUNING_FILE).read_bytes()

    def no_training(*args, **kwargs):
        raise AssertionError("a candidate trained")

    monkeypatch.setattr("xentlab.lab.run.train", no_training)
    wider = "tune.grid={optimizer.lr: [0.0001, 0.01, 0.03]}"  # a new plan: its candidates would train
    with pytest.raises(FolderHoldsARun, match=r"seed=0/metrics\.json records a completed run of 3 epochs"):
        tune(config(wider, ONE_GAMMA), folder, say=lambda *a, **k: None)
    assert (folder / TUNING_FILE).read_bytes() == written


def test_the_report_names_each_losss_tuned_setting(tuned, capsys):
    from xentlab.lab.report.terminal import console_for_output, print_report

    folder, cfg, _ = tuned
    report = build_report(folder)
    table = tuning_table(report)
    chosen = ", ".join(cfg.tune.result.chosen)
    score = f"{cfg.tune.result.score:.4f}"
    assert table.rows == [["", "loss=focal", chosen, "val/balanced_accuracy", score, 2, "[1000, 1001]"]]
    print_report(report, console_for_output())
    assert f"tuned loss=focal: {chosen}" in capsys.readouterr().out
