"""The sweep report against hand-computed numbers on synthetic metrics.json files (no training here)."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest

from xentlab import cli
from xentlab.report import build_report, summarize, write_report

# Student t quantile t_{0.975, 2} from a printed table: the 95% half-width for 3 seeds is T2 * s / sqrt(3).
T2 = 4.302652729911275

# (ratio, loss) -> per seed (0, 1, 2): (minority recall, balanced accuracy, nll or None)
VALUES = {
    (100, "ce"): [(0.10, 0.50, 1.2), (0.20, 0.52, 1.4), (0.30, 0.54, None)],
    (100, "focal"): [(0.50, 0.55, 1.0), (0.62, 0.56, 1.1), (0.68, 0.60, 1.2)],
    (10, "ce"): [(0.40, 0.70, 0.9), (0.42, 0.71, 0.8), (0.44, 0.72, 0.7)],
    (10, "focal"): [(0.30, 0.60, 0.9), (0.31, 0.61, 0.9), (0.32, 0.62, 0.9)],
}


def write_job(sweep: Path, overrides: list[str], record: dict) -> Path:
    job = sweep / ",".join(sorted(overrides))
    (job / ".hydra").mkdir(parents=True)
    (job / "metrics.json").write_text(json.dumps({"overrides": overrides, **record}))
    return job


def synthetic_sweep(sweep: Path) -> None:
    """Twelve completed jobs, one failed, one started but unfinished; no job reports ECE."""
    for (ratio, loss), seeds in VALUES.items():
        for seed, (minority, balanced, nll) in enumerate(seeds):
            metrics = {"test/minority_recall": minority, "test/balanced_accuracy": balanced,
                       "test/recall_class_0": 1.0 - minority, "test/recall_class_1": minority}
            if nll is not None:
                metrics["test/nll"] = nll
            config = {"seed": seed, "loss": {"name": loss}, "data": {"imbalance_ratio": ratio}}
            overrides = ["experiment=x", f"loss={loss}", f"data.imbalance_ratio={ratio}", f"seed={seed}"]
            write_job(sweep, overrides, {"status": "completed", "metrics": metrics, "config": config})
    write_job(sweep, ["experiment=x", "loss=mse", "data.imbalance_ratio=100", "seed=0"],
              {"status": "failed", "error": "ValueError: boom", "metrics": {},
               "config": {"seed": 0, "loss": {"name": "mse"}, "data": {"imbalance_ratio": 100}}})
    (sweep / "data.imbalance_ratio=100,loss=mse,seed=1" / ".hydra").mkdir(parents=True)


def hand_summary(values):
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    return mean, T2 * std / math.sqrt(n)


def test_summarize_is_student_t_mean_and_half_width():
    mean, half = hand_summary([0.5, 0.62, 0.68])
    summary = summarize([0.5, 0.62, 0.68, math.nan])  # NaN: a diverged metric is left out, not averaged in
    assert summary.n == 3
    assert summary.mean == pytest.approx(mean) and summary.half_width == pytest.approx(half)
    single = summarize([0.3])
    assert single.mean == 0.3 and single.n == 1 and math.isnan(single.half_width)
    assert summarize([]).n == 0


def test_report_numbers_match_hand_computation(tmp_path, capsys):
    synthetic_sweep(tmp_path)
    report = write_report(tmp_path)

    rows = {(r["context"], r["group"]): r for r in csv.DictReader((tmp_path / "report.csv").open())}
    assert set(rows) == {(f"data.imbalance_ratio={r}", f"loss={loss}") for r, loss in VALUES}
    for (ratio, loss), seeds in VALUES.items():
        row = rows[(f"data.imbalance_ratio={ratio}", f"loss={loss}")]
        assert row["n"] == "3" and row["experiment"] == "x"
        for column, index in (("test/minority_recall", 0), ("test/balanced_accuracy", 1)):
            mean, half = hand_summary([s[index] for s in seeds])
            assert float(row[f"{column}_mean"]) == pytest.approx(mean), (ratio, loss, column)
            assert float(row[f"{column}_ci95"]) == pytest.approx(half), (ratio, loss, column)
    assert rows[("data.imbalance_ratio=100", "loss=ce")]["test/nll_n"] == "2"

    # Ratio 100, minority recall: focal 0.600 vs ce 0.200; the intervals overlap, but the per-seed
    # differences (0.40, 0.42, 0.38) have a 95% interval well above 0.
    verdict = next(v for v in report.verdicts
                   if v.context == "data.imbalance_ratio=100" and v.metric.key == "test/minority_recall")
    assert (verdict.best.label, verdict.runner_up.label) == ("loss=focal", "loss=ce")
    diff_mean, diff_half = hand_summary([0.40, 0.42, 0.38])
    assert verdict.paired.mean == pytest.approx(diff_mean)
    assert verdict.paired.half_width == pytest.approx(diff_half)
    sentence = verdict.sentence()
    assert "loss=focal 0.600 ± 0.228 beats loss=ce 0.200 ± 0.248 by 0.400" in sentence
    assert "excludes 0" in sentence
    # Ratio 10, balanced accuracy: ce [0.685, 0.735] vs focal [0.585, 0.635] do not overlap.
    clear = next(v for v in report.verdicts
                 if v.context == "data.imbalance_ratio=10" and v.metric.key == "test/balanced_accuracy")
    assert clear.best.label == "loss=ce" and "do not overlap" in clear.sentence()
    nll = next(v for v in report.verdicts
               if v.context == "data.imbalance_ratio=10" and v.metric.key == "test/nll")
    assert nll.best.label == "loss=ce"  # lower is better: ce 0.8 < focal 0.9

    md = (tmp_path / "report.md").read_text()
    assert sentence in md
    assert "| data.imbalance_ratio=100 | loss=focal | 3 | **★ 0.570 ± 0.066** | **★ 0.600 ± 0.228** |" in md
    # One ce run did not report NLL: its cell says over how many runs that mean is.
    row = "| data.imbalance_ratio=100 | loss=ce | 3 | 0.520 ± 0.050 | 0.200 ± 0.248 | 1.300 ± 1.271 (n=2) |"
    assert row in md
    assert "ECE" not in md.split("## Results")[1].split("\n")[4]  # no run reported it: no column
    assert "Not reported by these runs: test/macro_f1, test/ece." in md
    assert "| failed | ValueError: boom |" in md
    assert "data.imbalance_ratio=100,loss=mse,seed=1" in md  # started, no metrics.json yet
    assert {p.name for p in report.files} == {"report.md", "report.csv", "report_metric_vs_ratio.png",
                                              "report_class_recall.png"}
    for png in ("report_metric_vs_ratio.png", "report_class_recall.png"):
        assert (tmp_path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    printed = capsys.readouterr().out
    assert "loss=focal" in printed and "failed ×1" in printed and "1 job(s) started" in printed


def test_groups_by_varying_config_when_overrides_were_not_recorded(tmp_path):
    for loss, values in (("ce", [0.1, 0.3]), ("focal", [0.5, 0.7])):
        for seed, value in enumerate(values):
            job = tmp_path / f"{loss}{seed}"
            job.mkdir()
            config = {"seed": seed, "loss": {"name": loss}, "data": {"imbalance_ratio": 10}}
            (job / "metrics.json").write_text(json.dumps(
                {"status": "completed", "config": config, "metrics": {"test/minority_recall": value}}))
    report = build_report(tmp_path)
    assert [(g.label, len(g.runs)) for g in report.groups] == [("loss.name=ce", 2), ("loss.name=focal", 2)]
    assert report.groups[1].stats["test/minority_recall"].mean == pytest.approx(0.6)
    assert report.verdicts[0].best.label == "loss.name=focal"


def test_unreadable_and_empty_sweeps_are_reported_not_raised(tmp_path):
    job = tmp_path / "loss=ce,seed=0"
    job.mkdir()
    (job / "metrics.json").write_text('{"status": "compl')  # a job killed mid-write by an older version
    report = build_report(tmp_path)
    assert report.groups == [] and [r.status for r in report.problems] == ["unreadable"]


def test_cli_report_command(tmp_path, capsys):
    synthetic_sweep(tmp_path)
    assert cli.main(["report", str(tmp_path)]) == 0
    assert (tmp_path / "report.md").exists()
    assert cli.main(["report", str(tmp_path / "nope")]) == 2
    assert "does not exist" in capsys.readouterr().err
