"""After short real runs (a small sweep), TensorBoard's reader and a real `tensorboard` server find what
xentlab logged, laid out as docs/metrics.md says: numbered stage groups, no `epoch` card, an HParams
session per run in its `hparams` sub-run with the varied keys and only the hp/ metrics."""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
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

from xentlab.lab.board import HEADLINE_METRICS, HPARAMS_RUN, board_tag
from xentlab.lab.data import build_datamodule
from xentlab.lab.module import session_hparams
from xentlab.lab.report.sweep import read_curve
from xentlab.lab.run import train
from xentlab.train import CONFIG_DIR

ROOT = Path(__file__).resolve().parent.parent
COMMON = ["trainer.max_epochs=2", "model.hidden_sizes=[16]"]
RUNS = {
    # Figures every validation epoch and step scalars every step in this run; the other keeps the
    # default figure cadence (only the last epoch) and writes step scalars every 3rd step.
    "multiclass": ["data.n_samples=400", "data.imbalance_ratio=10", "figure_every_n_epochs=1",
                   "trainer.log_every_n_steps=1", *COMMON],
    "multilabel": ["data=multilabel", "loss=bce", "data.n_samples=300", "data.n_classes=4",
                   "data.min_class_samples=30", "trainer.log_every_n_steps=3", *COMMON],
}
# The multiclass run again with another seed: same setting, so its loss-curve figure is not drawn twice.
TWIN = {"multiclass_seed1": [*RUNS["multiclass"], "seed=1"]}
STAGES = ("train", "val", "test")


@pytest.fixture(scope="module")
def logs(tmp_path_factory):
    """Three 2-epoch runs side by side under one log dir, as in a sweep: (root, {run: (cfg, record)})."""
    root = tmp_path_factory.mktemp("tensorboard")
    runs = {}
    for name, overrides in {**RUNS, **TWIN}.items():
        with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
            cfg = compose(config_name="config", overrides=overrides)
        runs[name] = (cfg, train(cfg, root / name, overrides=overrides, shared_dir=root)[0])
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
    groups = {board_tag(f"{stage}/x").split("/")[0] for stage in STAGES}
    assert {tag.split("/")[0] for tag in tags} == groups, sorted(tags)
    assert "epoch" not in tags and "hp_metric" not in tags  # Lightning's counter and -1 placeholder
    names = (["accuracy", "balanced_accuracy", "macro_f1", "nll", "brier", "ece"] if run == "multiclass" else
             ["balanced_accuracy", "micro_f1", "macro_f1", "map", "hamming_loss", "nll", "brier", "ece"])
    datamodule = build_datamodule(seed=cfg.seed, **cfg.data)
    counts = datamodule.class_counts
    for stage, epochs in (("val", 2), ("test", 1)):
        for name in [*names, "minority_recall", *(f"recall_class_{c}" for c in range(len(counts)))]:
            values = [event.value for event in events.Scalars(board_tag(f"{stage}/{name}"))]
            assert len(values) == epochs, (stage, name)
            assert values[-1] == pytest.approx(record["metrics"][f"{stage}/{name}"], rel=1e-6)
        rarest = int(torch.argmin(counts))
        metrics = record["metrics"]
        assert metrics[f"{stage}/minority_recall"] == metrics[f"{stage}/recall_class_{rarest}"]
    assert cfg.objective in record["metrics"]
    assert len(events.Scalars(board_tag("train/loss"))) == 2
    pushes = events.Scalars(board_tag("train/logit_grad_norm"))
    batches = len(datamodule.train_dataloader())
    # log_every_n_steps, capped at the batches of an epoch (xentlab.lab.run.trainer_arguments).
    steps, every = batches * record["epochs"], min(cfg.trainer.log_every_n_steps, batches)
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
            logged = images[board_tag(f"{stage}/{figure}")]
            assert len(logged) == expected, (stage, figure)
            picture = Image.open(io.BytesIO(logged[-1].encoded_image_string))
            assert picture.width > 100 and picture.height > 100
    cfg = runs[run][0]
    num_outputs = build_datamodule(seed=cfg.seed, **cfg.data).num_classes
    tensors = set(events.Tags()["tensors"])
    for c in range(num_outputs):
        assert {board_tag(f"val/pr_class_{c}"), board_tag(f"test/pr_class_{c}")} <= tensors
        assert len(events.Tensors(board_tag(f"val/pr_class_{c}"))) == val_images
    assert "data/class_counts/text_summary" in tensors


def test_the_report_reads_the_validation_curve_under_its_board_tag(logs):
    root, runs = logs
    curve = read_curve(root / "multiclass", "val/balanced_accuracy")
    final = runs["multiclass"][1]["metrics"]["val/balanced_accuracy"]
    assert len(curve) == 2 and curve[-1] == pytest.approx(final)


def test_loss_curves_are_drawn_once_per_setting_not_per_seed(logs):
    root, _ = logs
    drawn = {run: "loss_curves" in accumulator(root / run).Tags()["images"] for run in (*RUNS, *TWIN)}
    assert drawn == {"multiclass": True, "multilabel": True, "multiclass_seed1": False}


@pytest.mark.parametrize("run", RUNS)
def test_posthoc_adjustments_reach_metrics_json(logs, run):
    _, runs = logs
    metrics = runs[run][1]["metrics"]
    assert metrics["test/temperature"] > 0
    for name in ("ece", "nll", "brier", "overconfidence"):
        assert math.isfinite(metrics[f"test/ts_{name}"])
    # Scaling by the NLL-optimal validation temperature changes no decision, only the probabilities.
    assert metrics["test/ts_nll"] != metrics["test/nll"]
    adjusted = {"test/la_balanced_accuracy", "test/la_minority_recall", "test/la_accuracy"}
    if run == "multilabel":
        assert not adjusted & set(metrics)  # logit adjustment is for single-label decisions
    else:
        assert all(0 <= metrics[name] <= 1 for name in adjusted)


@pytest.mark.parametrize("run", RUNS)
def test_hparams_session_holds_the_varied_keys_and_only_the_final_metrics(logs, run):
    root, runs = logs
    cfg, record = runs[run]
    with pytest.raises(KeyError, match="hparams"):  # the run itself holds no HParams data
        accumulator(root / run).PluginTagToContent("hparams")
    events = accumulator(root / run / HPARAMS_RUN)
    data = hparams_data(events)
    (start,) = [d.session_start_info for d in data.values() if d.HasField("session_start_info")]
    # No per-run experiment summary: TensorBoard would show only the first run's hyperparameters.
    assert not any(d.HasField("experiment") for d in data.values())
    hparams = start.hparams
    assert hparams["loss.name"].string_value == cfg.loss.name
    assert hparams["seed"].string_value == str(cfg.seed)
    assert hparams["trainer.max_epochs"].number_value == 2  # given on the command line
    assert not {"data.batch_size", "ckpt_path", "optimizer.lr", "model.dropout"} & set(hparams)  # constants
    if run == "multiclass":
        assert hparams["data.imbalance_ratio"].number_value == 10
        assert "data.name" not in hparams  # the default dataset, not chosen on the command line
    else:
        assert hparams["data.name"].string_value == "multilabel"
        assert hparams["loss.pos_weight"].string_value == "None"
    metric_tags = set(events.Tags()["scalars"])
    assert all(tag.startswith("hp/") for tag in metric_tags)
    assert {"hp/balanced_accuracy", "hp/minority_recall", "hp/macro_f1", "hp/ece", "hp/ts_ece"} <= metric_tags
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


@contextlib.contextmanager
def tensorboard_server(logdir: Path, ready):
    """A real `tensorboard` on a free local port, yielded as its base URL once `ready(scalar tags)`."""
    port = free_port()
    script = Path(sys.executable).with_name("tensorboard")
    command = [str(script), "--logdir", str(logdir), "--port", str(port), "--host", "127.0.0.1"]
    server = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        poll(f"{base}/data/plugin/scalars/tags", ready, time.monotonic() + 60, server)
        yield base
    finally:
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def test_tensorboard_server_answers_with_the_runs(logs):
    root, runs_logged = logs
    names = [*RUNS, *TWIN]
    sessions = [f"{run}/{HPARAMS_RUN}" for run in names]
    with tensorboard_server(root, lambda tags: set(names) <= set(tags)) as base:
        runs = get_json(f"{base}/data/runs")
        assert set(runs) == {*names, *sessions}
        tags = get_json(f"{base}/data/plugin/scalars/tags")
        expected = {"1_val/balanced_accuracy", "1_val/recall_class_4", "2_test/minority_recall",
                    "3_train/logit_grad_norm"}
        assert expected <= set(tags["multiclass"])
        assert {"1_val/map", "1_val/hamming_loss"} <= set(tags["multilabel"])
        assert not any("epoch" in run_tags for run_tags in tags.values())
        images = get_json(f"{base}/data/plugin/images/tags")
        assert {"1_val/confusion_matrix", "1_val/reliability", "loss_curves"} <= set(images["multiclass"])
        assert "loss_curves" not in images.get("multiclass_seed1", {})
        # Time Series sorts tag groups by name (digits first) and opens the first two.
        groups = sorted({tag.split("/")[0] for found in (tags, images) for run_tags in found.values()
                         for tag in run_tags})
        assert groups[:2] == ["1_val", "2_test"], groups

        # HParams: the union of the runs' varied keys and loss parameters, and only the hp/ metrics.
        experiment = get_json(f"{base}/data/plugin/hparams/experiment", {"experimentName": ""})
        infos = {h["name"]: h for h in experiment["hparamInfos"]}
        assert {"loss.name", "loss.pos_weight", "seed", "data.imbalance_ratio", "data.name",
                "data.n_classes", "trainer.max_epochs"} <= set(infos)
        assert not {"data.batch_size", "ckpt_path", "optimizer.lr", "model.dropout", "data.n_features"} \
            & set(infos)
        assert set(infos["loss.name"]["domainDiscrete"]) == {"ce", "bce"}
        assert infos["seed"]["type"] == "DATA_TYPE_STRING"
        assert set(infos["seed"]["domainDiscrete"]) == {"0", "1"}
        metrics = {m["name"]["tag"] for m in experiment["metricInfos"]}
        assert {"hp/balanced_accuracy", "hp/ts_ece", "hp/la_balanced_accuracy"} <= metrics
        assert all(tag.startswith("hp/") for tag in metrics), sorted(metrics)

        statuses = ["STATUS_UNKNOWN", "STATUS_SUCCESS", "STATUS_FAILURE", "STATUS_RUNNING"]
        request = {"experimentName": "", "startIndex": 0, "sliceSize": 100, "allowedStatuses": statuses,
                   "colParams": [{"metric": {"tag": "hp/balanced_accuracy"}}, {"hparam": "seed"}]}
        groups = get_json(f"{base}/data/plugin/hparams/session_groups", request)["sessionGroups"]
        assert {group["name"] for group in groups} == set(sessions)
        for group in groups:
            run = group["name"].removesuffix(f"/{HPARAMS_RUN}")
            cfg, record = runs_logged[run]
            assert group["hparams"]["seed"] == str(cfg.seed)
            (value,) = [m["value"] for m in group["metricValues"]
                        if m["name"]["tag"] == "hp/balanced_accuracy"]
            assert value == pytest.approx(record["metrics"]["test/balanced_accuracy"], rel=1e-6)


def test_session_hparams_keep_the_loss_the_seed_and_what_the_sweep_varies():
    params = {"loss.name": "focal", "loss.gamma": 2.0, "loss.alpha": None, "seed": 3, "data.name": "digits",
              "data.n_samples": 3000, "data.batch_size": 128, "optimizer._target_": "torch.optim.SGD",
              "optimizer.lr": 0.1, "ckpt_path": None}
    overrides = ["loss=focal", "seed=3", "data=digits", "data.n_samples=3000", "optimizer=sgd",
                 "experiment=calibration", "ckpt_path=last", "hydra/launcher=joblib"]
    every_override = session_hparams(params, overrides)
    assert every_override == {"loss.name": "focal", "loss.gamma": 2.0, "loss.alpha": "None", "seed": "3",
                              "data.name": "digits", "data.n_samples": 3000,
                              "optimizer._target_": "torch.optim.SGD"}
    swept = session_hparams(params, overrides, varied=["loss", "seed", "optimizer"])
    assert swept == {"loss.name": "focal", "loss.gamma": 2.0, "loss.alpha": "None", "seed": "3",
                     "optimizer._target_": "torch.optim.SGD"}
    # A choice of a group that only sets other keys shows as itself.
    assert session_hparams(params, ["+method=ldam_drw"], varied=["method"])["method"] == "ldam_drw"


# --- a sweep's per-setting summaries, and the views of them in a real browser -----------------------------

LOSSES = ("ce", "focal", "logit_adjusted")
SEEDS = 5


@pytest.fixture(scope="module")
def sweep_dir(tmp_path_factory) -> Path:
    """A real multirun, 3 losses x 5 seeds (one seed batch per loss), 3 epochs on tiny data; no report."""
    root = tmp_path_factory.mktemp("sweep")
    command = [str(Path(sys.executable).with_name("xentlab-train")), "-m", f"loss={','.join(LOSSES)}",
               f"seeds={SEEDS}", "trainer.max_epochs=3", "data.n_samples=400", "model.hidden_sizes=[8]",
               f"hydra.sweep.dir={root / 'sweep'}", "~hydra.callbacks.report"]
    result = subprocess.run(command, cwd=root, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "Custom Scalars" in result.stdout
    return root / "sweep"


def test_job_folders_are_named_by_the_swept_keys_only(sweep_dir):
    assert sorted(p.name for p in sweep_dir.iterdir() if (p / ".hydra").is_dir()) == \
        [f"loss={loss}" for loss in LOSSES]  # not `loss=ce,model.hidden_sizes=[8],seeds=5,...`


@pytest.mark.parametrize("loss", LOSSES)
def test_summary_run_holds_the_mean_and_95_interval_over_the_seeds(sweep_dir, loss):
    from scipy import stats

    summary = accumulator(sweep_dir / "summary" / f"loss={loss}")
    seeds = [accumulator(sweep_dir / f"loss={loss}" / f"seed={seed}") for seed in range(SEEDS)]
    tags = set(summary.Tags()["scalars"])
    for tag in ("1_val/balanced_accuracy", "1_val/nll", "2_test/ece", "3_train/loss"):
        per_seed = [{e.step: e.value for e in run.Scalars(tag)} for run in seeds]
        means = {e.step: e.value for e in summary.Scalars(tag)}
        lows = {e.step: e.value for e in summary.Scalars(f"interval/{tag}/low")}
        highs = {e.step: e.value for e in summary.Scalars(f"interval/{tag}/high")}
        assert {f"interval/{tag}/low", f"interval/{tag}/high"} <= tags
        assert set(means) == set(per_seed[0]) and len(means) == (1 if tag.startswith("2_test") else 3)
        for step, mean in means.items():
            values = [run[step] for run in per_seed]
            assert mean == pytest.approx(sum(values) / SEEDS, rel=1e-5)
            half = stats.t.ppf(0.975, SEEDS - 1) * stats.tstd(values) / math.sqrt(SEEDS)
            low, high = mean - half, mean + half
            if tag != "1_val/nll" and tag != "3_train/loss":  # rates and ECE lie in [0, 1]
                low, high = max(low, 0.0), min(high, 1.0)
            assert lows[step] == pytest.approx(low, rel=1e-4, abs=1e-6)
            assert highs[step] == pytest.approx(high, rel=1e-4, abs=1e-6)
            if stats.tstd(values) > 0:
                assert lows[step] < mean < highs[step]


def test_custom_scalars_margin_charts_and_hparams_headline_first(sweep_dir):
    summaries = {f"summary/loss={loss}" for loss in LOSSES}
    with tensorboard_server(sweep_dir, lambda tags: summaries <= set(tags)) as base:
        runs = set(get_json(f"{base}/data/runs"))
        assert summaries <= runs
        tags = get_json(f"{base}/data/plugin/scalars/tags")
        layout = get_json(f"{base}/data/plugin/custom_scalars/layout")
        (category,) = layout["category"]  # one category, however many summary runs carry it
        charts = {chart["title"]: chart["margin"]["series"] for chart in category["chart"]}
        # Listed last to first: the Custom Scalars tab draws a category's charts in reverse order.
        assert list(charts)[::-1] == [*(f"val/{m}" for m in HEADLINE_METRICS), "train/loss"]
        for title, (series,) in charts.items():
            assert series["value"] == board_tag(title)
            for run in summaries:  # every setting draws one line with its band
                assert {series["value"], series["lower"], series["upper"]} <= set(tags[run])
            drawn = [run for run in runs if {series["value"], series["lower"]} <= set(tags.get(run, {}))]
            assert sorted(drawn) == sorted(summaries)  # the seeds' own runs have no band: no extra lines

        experiment = get_json(f"{base}/data/plugin/hparams/experiment", {"experimentName": ""})
        metrics = [m["name"]["tag"] for m in experiment["metricInfos"]]
        assert metrics[:len(HEADLINE_METRICS)] == [f"hp/{m}" for m in HEADLINE_METRICS]
        assert "hp/accuracy" in metrics[len(HEADLINE_METRICS):]
        infos = {h["name"]: h for h in experiment["hparamInfos"]}
        assert set(infos["loss.name"]["domainDiscrete"]) == set(LOSSES)
        assert set(infos["seed"]["domainDiscrete"]) == {str(seed) for seed in range(SEEDS)}
        assert "loss.gamma" in infos and "loss.tau" in infos  # every loss's parameters, not the first's


def test_screenshots_of_the_sweep_in_headless_chromium(sweep_dir, chromium, tmp_path):
    """scripts/screenshots.sh on the sweep: Time Series, Custom Scalars and HParams, drawn by Chromium."""
    env = {**os.environ, "SWEEP": str(sweep_dir), "OUT": str(tmp_path), "BROWSER": chromium,
           "VENV": str(Path(sys.executable).parent.parent)}
    result = subprocess.run(["bash", str(ROOT / "scripts" / "screenshots.sh")], env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    for name in ("tensorboard_scalars.png", "tensorboard_custom_scalars.png", "tensorboard_hparams.png"):
        picture = Image.open(tmp_path / name).convert("RGB")
        assert picture.width >= 1600 and picture.height >= 680
        # A drawn page, not a blank one: TensorBoard's orange bar and a spread of other colours.
        colours = picture.getcolors(maxcolors=1 << 20)
        assert len(colours) > 200, name
