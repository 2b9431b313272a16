"""logger=csv|wandb|mlflow: each writes its files into the run folder with no network and no account, beside
TensorBoard's, and gets the run's metrics, its settings as hyperparameters and its record. Files are read
back with each tool's own reader where it has one (csv, MLflow's client)."""

from __future__ import annotations

import csv
import json

import pytest
import yaml
from hydra import compose, initialize_config_dir

from xentlab.lab.run import train
from xentlab.train import CONFIG_DIR

QUICK = ["data=wine", "model.hidden_sizes=[8]", "trainer.max_epochs=2"]


def run(tmp_path, *overrides: str) -> dict:
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(config_name="config", overrides=[*QUICK, *overrides])
    (record,) = train(cfg, tmp_path, threads=1)
    assert record["status"] == "completed"
    assert list(tmp_path.glob("events.out.tfevents.*"))  # TensorBoard's files are always written
    return record


def test_csv_logger(tmp_path):
    record = run(tmp_path, "logger=csv")
    with open(tmp_path / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert sum(bool(row.get("val/balanced_accuracy")) for row in rows) == 2  # one per epoch
    (test_row,) = [row for row in rows if row.get("test/balanced_accuracy")]
    final = record["metrics"]["test/balanced_accuracy"]
    assert float(test_row["test/balanced_accuracy"]) == pytest.approx(final)
    hparams = yaml.safe_load((tmp_path / "hparams.yaml").read_text())
    assert (hparams["loss.name"], hparams["data.name"], hparams["status"]) == ("ce", "wine", "completed")


def test_each_seed_of_a_batch_gets_its_own_csv_logger(tmp_path):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(config_name="config", overrides=[*QUICK, "logger=csv", "seed=3", "seeds=2"])
    records = train(cfg, tmp_path, threads=1)
    for seed, record in zip((3, 4), records, strict=True):
        folder = tmp_path / f"seed={seed}"
        with open(folder / "metrics.csv", newline="") as f:
            (test_row,) = [row for row in csv.DictReader(f) if row.get("test/balanced_accuracy")]
        assert float(test_row["test/balanced_accuracy"]) == pytest.approx(
            record["metrics"]["test/balanced_accuracy"])
        hparams = yaml.safe_load((folder / "hparams.yaml").read_text())
        assert (hparams["seed"], hparams["status"]) == (seed, "completed")


def test_mlflow_logger_keeps_a_local_file_store(tmp_path):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    record = run(tmp_path, "logger=mlflow")
    client = MlflowClient(tracking_uri=(tmp_path / "mlruns").as_uri())
    (experiment,) = [e for e in client.search_experiments() if e.name == "xentlab"]
    (mlrun,) = client.search_runs([experiment.experiment_id])
    assert mlrun.data.params["loss.name"] == "ce" and mlrun.data.params["seed"] == "0"
    assert mlrun.data.tags["status"] == "completed"
    assert len(client.get_metric_history(mlrun.info.run_id, "val/balanced_accuracy")) == 2
    assert mlrun.data.metrics["test/balanced_accuracy"] == pytest.approx(
        record["metrics"]["test/balanced_accuracy"])
    assert "metrics.json" in [a.path for a in client.list_artifacts(mlrun.info.run_id)]


def test_wandb_logger_runs_offline(tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run(tmp_path, "logger=wandb")
    # W&B's service writes the run's log after finish() returns; teardown waits for it, as the end of the
    # process does.
    wandb.teardown()
    (offline,) = tmp_path.glob("wandb/offline-run-*")
    saved = json.loads((offline / "files" / "metrics.json").read_text())  # the record, saved with the run
    assert saved["status"] == "completed"
    # The run's own log (W&B's binary format, read by its Go core): the metric names, the settings and
    # the record's status are in it.
    (log,) = offline.glob("run-*.wandb")
    content = log.read_bytes()
    for key in (b"val/balanced_accuracy", b"test/balanced_accuracy", b"loss.name", b"status"):
        assert key in content, key


def test_an_unknown_or_missing_logger_is_named():
    import importlib.util

    from xentlab.lab.loggers import check_logger

    with pytest.raises(ValueError, match="logger=neptune is not a logger; choose one of tensorboard, csv"):
        check_logger("neptune")
    if importlib.util.find_spec("wandb") is None:
        with pytest.raises(ImportError, match=r"xentlab\[wandb\]"):
            check_logger("wandb")
