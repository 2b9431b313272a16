"""After short real runs, TensorBoard's reader and a real `tensorboard` server find what xentlab logged."""

from __future__ import annotations

import io
import json
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import plugin_data_pb2

from xentlab.data import build_datamodule
from xentlab.train import CONFIG_DIR, train

COMMON = ["trainer.max_epochs=2", "model.hidden_sizes=[16]"]
RUNS = {
    # Figures every validation epoch and step scalars every step in this run; the other keeps the
    # default figure cadence (only the last epoch) and writes step scalars every 3rd step.
    "multiclass": ["data.n_samples=400", "data.imbalance_ratio=10", "figure_every_n_epochs=1",
                   "trainer.log_every_n_steps=1", *COMMON],
    "multilabel": ["data=multilabel", "loss=bce", "data.n_samples=300", "data.n_classes=4",
                   "data.min_class_samples=30", "trainer.log_every_n_steps=3", *COMMON],
}
STAGES = ("train", "val", "test")


@pytest.fixture(scope="module")
def logs(tmp_path_factory):
    """Two 2-epoch runs side by side under one log dir, as in a sweep: (root, {run: (cfg, record)})."""
    root = tmp_path_factory.mktemp("tensorboard")
    runs = {}
    for name, overrides in RUNS.items():
        with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
            cfg = compose(config_name="config", overrides=overrides)
        runs[name] = (cfg, train(cfg, root / name))
    return root, runs


def accumulator(run_dir: Path) -> EventAccumulator:
    events = EventAccumulator(str(run_dir), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    events.Reload()
    return events


def hparams_data(events: EventAccumulator) -> dict:
    content = events.PluginTagToContent("hparams")
    return {tag: plugin_data_pb2.HParamsPluginData.FromString(raw) for tag, raw in content.items()}


@pytest.mark.parametrize("run", RUNS)
def test_scalars_are_grouped_by_stage_and_match_metrics_json(logs, run):
    root, runs = logs
    cfg, record = runs[run]
    assert record["status"] == "completed"
    events = accumulator(root / run)
    tags = set(events.Tags()["scalars"])
    assert all(tag.split("/")[0] in (*STAGES, "hp") for tag in tags - {"epoch"}), sorted(tags)
    assert "hp_metric" not in tags  # Lightning's -1 placeholder
    names = (["accuracy", "balanced_accuracy", "macro_f1", "nll", "brier", "ece"] if run == "multiclass" else
             ["balanced_accuracy", "micro_f1", "macro_f1", "map", "hamming_loss", "nll", "brier", "ece"])
    datamodule = build_datamodule(seed=cfg.seed, **cfg.data)
    counts = datamodule.class_counts
    for stage, epochs in (("val", 2), ("test", 1)):
        for name in [*names, "minority_recall", *(f"recall_class_{c}" for c in range(len(counts)))]:
            values = [event.value for event in events.Scalars(f"{stage}/{name}")]
            assert len(values) == epochs, (stage, name)
            assert values[-1] == pytest.approx(record["metrics"][f"{stage}/{name}"], rel=1e-6)
        rarest = int(torch.argmin(counts))
        metrics = record["metrics"]
        assert metrics[f"{stage}/minority_recall"] == metrics[f"{stage}/recall_class_{rarest}"]
    assert cfg.objective in record["metrics"]
    assert len(events.Scalars("train/loss")) == 2
    pushes = events.Scalars("train/logit_grad_norm")
    steps, every = len(datamodule.train_dataloader()) * record["epochs"], cfg.trainer.log_every_n_steps
    # Read on exactly the steps Lightning writes (steps every-1, 2*every-1, ...), none lost, none extra.
    assert [event.step for event in pushes] == list(range(every - 1, steps, every))
    assert all(event.value > 0 for event in pushes)


@pytest.mark.parametrize(("run", "val_images"), [("multiclass", 2), ("multilabel", 1)])
def test_figures_and_pr_curves_are_logged(logs, run, val_images):
    root, runs = logs
    events = accumulator(root / run)
    images = {tag: events.Images(tag) for tag in events.Tags()["images"]}
    assert len(images["loss_curves"]) == 1
    for stage, expected in (("val", val_images), ("test", 1)):
        for figure in ("confusion_matrix", "reliability"):
            logged = images[f"{stage}/{figure}"]
            assert len(logged) == expected, (stage, figure)
            picture = Image.open(io.BytesIO(logged[-1].encoded_image_string))
            assert picture.width > 100 and picture.height > 100
    cfg = runs[run][0]
    num_outputs = build_datamodule(seed=cfg.seed, **cfg.data).num_classes
    tensors = set(events.Tags()["tensors"])
    for c in range(num_outputs):
        assert {f"val/pr_class_{c}", f"test/pr_class_{c}"} <= tensors
        assert len(events.Tensors(f"val/pr_class_{c}")) == val_images
    assert "data/class_counts/text_summary" in tensors


@pytest.mark.parametrize("run", RUNS)
def test_hparams_session_holds_the_run_and_its_final_metrics(logs, run):
    root, runs = logs
    cfg, record = runs[run]
    events = accumulator(root / run)
    data = hparams_data(events)
    (start,) = [d.session_start_info for d in data.values() if d.HasField("session_start_info")]
    # No per-run experiment summary: TensorBoard would show only the first run's hyperparameters.
    assert not any(d.HasField("experiment") for d in data.values())
    hparams = start.hparams
    assert hparams["loss.name"].string_value == cfg.loss.name
    assert hparams["data.name"].string_value == cfg.data.name
    assert hparams["seed"].number_value == cfg.seed
    if run == "multiclass":
        assert hparams["data.imbalance_ratio"].number_value == 10
    metric_tags = {tag for tag in events.Tags()["scalars"] if tag.startswith("hp/")}
    assert {"hp/balanced_accuracy", "hp/minority_recall", "hp/macro_f1", "hp/ece"} <= metric_tags
    assert "hp/loss" not in metric_tags
    if run == "multiclass":  # every class's recall, so the HParams view compares losses per class
        assert {f"hp/recall_class_{c}" for c in range(5)} <= metric_tags
    for tag in metric_tags:
        (value,) = [event.value for event in events.Scalars(tag)]
        assert value == pytest.approx(record["metrics"]["test/" + tag.removeprefix("hp/")], rel=1e-6)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def get_json(url: str, body: dict | None = None):
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=5) as response:
        return json.loads(response.read())


def poll(url: str, ready, deadline: float, server: subprocess.Popen):
    """GET `url` until `ready(answer)` holds; fail at `deadline` or if the server exits."""
    while time.monotonic() < deadline:
        assert server.poll() is None, server.communicate()[0]
        try:
            answer = get_json(url)
            if ready(answer):
                return answer
        except (urllib.error.URLError, ConnectionError, json.JSONDecodeError):
            pass
        time.sleep(0.5)
    pytest.fail(f"tensorboard did not answer {url} in time")


def test_tensorboard_server_answers_with_the_runs(logs):
    root, _ = logs
    port = free_port()
    script = Path(sys.executable).with_name("tensorboard")
    command = [str(script), "--logdir", str(root), "--port", str(port), "--host", "127.0.0.1"]
    server = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    base, deadline = f"http://127.0.0.1:{port}", time.monotonic() + 60
    try:
        runs = poll(f"{base}/data/runs", lambda answer: set(RUNS) <= set(answer), deadline, server)
        assert set(runs) == set(RUNS)
        tags = poll(f"{base}/data/plugin/scalars/tags", lambda got: set(RUNS) <= set(got), deadline, server)
        expected = {"val/balanced_accuracy", "val/recall_class_4", "test/minority_recall",
                    "train/logit_grad_norm"}
        assert expected <= set(tags["multiclass"])
        assert {"val/map", "val/hamming_loss"} <= set(tags["multilabel"])
        images = get_json(f"{base}/data/plugin/images/tags")
        assert {"val/confusion_matrix", "val/reliability", "loss_curves"} <= set(images["multiclass"])
        # The HParams view unites both runs' hyperparameters (multilabel data has no imbalance_ratio).
        experiment = get_json(f"{base}/data/plugin/hparams/experiment", {"experimentName": ""})
        hparam_names = {h["name"] for h in experiment["hparamInfos"]}
        assert {"loss.name", "data.imbalance_ratio", "data.n_labels", "seed"} <= hparam_names
        assert "hp/balanced_accuracy" in {m["name"]["tag"] for m in experiment["metricInfos"]}
        loss_names = next(h for h in experiment["hparamInfos"] if h["name"] == "loss.name")["domainDiscrete"]
        assert set(loss_names) == {"ce", "bce"}
    finally:
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
