"""The sweep report against hand-computed numbers on synthetic sweep folders (no training here): groups,
comparisons.csv, verdicts, bad input, partial sweeps, exit status, atomic files, plots, convergence."""

from __future__ import annotations

import csv
import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import yaml
from scipy import stats as scipy_stats

from xentlab import cli
from xentlab.lab.report import ReportWriteError, build_report, write_report
from xentlab.lab.report.convergence import epochs_to_threshold

# (ratio, loss) -> per seed (0, 1, 2): (minority recall, balanced accuracy, nll or None)
VALUES = {
    (100, "ce"): [(0.10, 0.50, 1.2), (0.20, 0.52, 1.4), (0.30, 0.54, None)],
    (100, "focal"): [(0.50, 0.55, 1.0), (0.62, 0.56, 1.1), (0.68, 0.60, 1.2)],
    (10, "ce"): [(0.40, 0.70, 0.9), (0.42, 0.71, 0.8), (0.44, 0.72, 0.7)],
    (10, "focal"): [(0.30, 0.60, 0.9), (0.31, 0.61, 0.9), (0.32, 0.62, 0.9)],
}


def write_job(sweep: Path, overrides: list[str], record: dict, *, nested: str = "") -> Path:
    job = sweep / ",".join(sorted(o for o in overrides if not (nested and o.startswith("seed="))))
    (job / ".hydra").mkdir(parents=True, exist_ok=True)
    (job / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    run = job / nested if nested else job
    run.mkdir(parents=True, exist_ok=True)
    (run / "metrics.json").write_text(json.dumps({"overrides": overrides, **record}))
    return run


def completed(loss: str, seed: int, ratio=10, **metrics) -> dict:
    return {"status": "completed", "metrics": metrics,
            "config": {"seed": seed, "loss": {"name": loss}, "data": {"imbalance_ratio": ratio}}}


def synthetic_sweep(sweep: Path) -> None:
    """Twelve completed jobs, one failed, one started but unfinished; no job reports ECE."""
    for (ratio, loss), seeds in VALUES.items():
        for seed, (minority, balanced, nll) in enumerate(seeds):
            metrics = {"test/minority_recall": minority, "test/balanced_accuracy": balanced,
                       "test/recall_class_0": 1.0 - minority, "test/recall_class_1": minority}
            if nll is not None:
                metrics["test/nll"] = nll
            overrides = ["experiment=x", f"loss={loss}", f"data.imbalance_ratio={ratio}", f"seed={seed}"]
            write_job(sweep, overrides, completed(loss, seed, ratio, **metrics))
    write_job(sweep, ["experiment=x", "loss=mse", "data.imbalance_ratio=100", "seed=0"],
              {"status": "failed", "error": "ValueError: boom", "metrics": {},
               "config": {"seed": 0, "loss": {"name": "mse"}, "data": {"imbalance_ratio": 100}}})
    (sweep / "data.imbalance_ratio=100,loss=mse,seed=1" / ".hydra").mkdir(parents=True)


def t_interval(values, low=0.0, high=1.0):
    values = np.asarray(values, dtype=float)
    half = scipy_stats.t.ppf(0.975, len(values) - 1) * values.std(ddof=1) / math.sqrt(len(values))
    return values.mean(), max(low, values.mean() - half), min(high, values.mean() + half)


def test_report_numbers_match_hand_computation(tmp_path, capsys):
    synthetic_sweep(tmp_path)
    report = write_report(tmp_path)

    rows = {(r["context"], r["group"]): r for r in csv.DictReader((tmp_path / "report.csv").open())}
    assert set(rows) == {(f"data.imbalance_ratio={r}", f"loss={loss}") for r, loss in VALUES}
    for (ratio, loss), seeds in VALUES.items():
        row = rows[(f"data.imbalance_ratio={ratio}", f"loss={loss}")]
        assert row["n"] == "3" and row["experiment"] == "x" and row["baseline"] == str(loss == "ce").lower()
        for column, index in (("test/minority_recall", 0), ("test/balanced_accuracy", 1)):
            mean, low, high = t_interval([s[index] for s in seeds])
            assert float(row[f"{column}_mean"]) == pytest.approx(mean), (ratio, loss, column)
            assert float(row[f"{column}_ci_low"]) == pytest.approx(low), (ratio, loss, column)
            assert float(row[f"{column}_ci_high"]) == pytest.approx(high), (ratio, loss, column)
    # ce at ratio 100, minority recall 0.1/0.2/0.3: the t interval [-0.048, 0.448] is clipped at 0.
    assert float(rows[("data.imbalance_ratio=100", "loss=ce")]["test/minority_recall_ci_low"]) == 0.0
    assert rows[("data.imbalance_ratio=100", "loss=ce")]["test/nll_n"] == "2"

    table = list(csv.DictReader((tmp_path / "comparisons.csv").open()))
    assert {"context", "metric", "loss", "baseline", "n", "diff", "ci_low", "ci_high", "p", "p_adjusted",
            "significant"} <= set(table[0])
    # focal vs ce at each ratio on balanced accuracy, minority recall and NLL (ECE: no run reported it).
    assert len(table) == 2 * 3 and {r["baseline"] for r in table} == {"loss=ce"}
    row = next(r for r in table if r["context"] == "data.imbalance_ratio=100"
               and r["metric"] == "test/minority_recall")
    diffs = [0.40, 0.42, 0.38]
    mean, low, high = t_interval(diffs, -1.0, 1.0)
    interval = (float(row["diff"]), float(row["ci_low"]), float(row["ci_high"]))
    assert interval == pytest.approx((mean, low, high))
    assert float(row["p"]) == pytest.approx(scipy_stats.ttest_1samp(diffs, 0.0).pvalue)  # normal-looking: t
    # Three seeds: never significant, no Holm family, and the report says how many seeds it needs.
    assert row["n"] == "3" and row["p_adjusted"] == "" and row["significant"] == "false"
    assert int(row["seeds_needed"]) >= 5
    nll = next(r for r in table if r["context"] == "data.imbalance_ratio=100" and r["metric"] == "test/nll")
    assert nll["n"] == "2"  # the seed whose ce run has no NLL is not matched

    md = (tmp_path / "report.md").read_text()
    # Three seeds: no claim, no mark.
    assert not [line for line in md.splitlines() if line.startswith("| data") and "★" in line]
    assert "no claim with fewer than 5 matched seeds: loss=focal +0.400 on n = 3" in md
    row = ("| data.imbalance_ratio=100 | loss=ce (baseline) | 3 | 0.520 [0.470, 0.570] "
           "| 0.200 [0.000, 0.448] |")
    assert row in md
    assert "better than" not in md and "clear win" not in md
    assert "Not reported by these runs: test/macro_f1, test/ece, test/prior_corrected_ece." in md
    assert "| failed | ValueError: boom |" in md
    assert "data.imbalance_ratio=100,loss=mse,seed=1" in md  # started, no metrics.json yet
    assert {p.name for p in report.files} == {"report.md", "report.csv", "comparisons.csv", "runs.csv",
                                              "report.json", "report_metric_vs_ratio.png",
                                              "report_class_recall.png", "rankings.csv", "aggregate.csv",
                                              "report_cd.png"}
    for png in ("report_metric_vs_ratio.png", "report_class_recall.png"):
        assert (tmp_path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(tmp_path.glob(".*.tmp"))  # atomic writes leave no staging file
    printed = capsys.readouterr().out
    assert "loss=focal" in printed and "failed ×1" in printed and "1 job(s) started" in printed


def test_significant_difference_is_starred_and_worded(tmp_path):
    rng = np.random.default_rng(0)
    for seed in range(8):
        base = 0.3 + 0.05 * rng.normal()
        for loss, shift in (("ce", 0.0), ("weighted_ce", 0.2), ("focal", 0.0)):
            value = base + shift + 0.02 * rng.normal()
            write_job(tmp_path, [f"loss={loss}", f"seed={seed}"], completed(loss, seed, **{
                "test/minority_recall": value, "test/balanced_accuracy": 0.6 + 0.01 * rng.normal()}))
    report = write_report(tmp_path)
    table = {(r["loss"], r["metric"]): r for r in csv.DictReader((tmp_path / "comparisons.csv").open())}
    hit = table[("loss=weighted_ce", "test/minority_recall")]
    assert hit["significant"] == "true" and hit["better"] == "true" and hit["seeds_better"] == "8"
    assert float(hit["p_adjusted"]) == pytest.approx(min(1.0, float(hit["p"]) * 4))  # smallest of 4 tests
    significant = [k for k, r in table.items() if r["significant"] == "true"]
    assert significant == [("loss=weighted_ce", "test/minority_recall")]
    md = (tmp_path / "report.md").read_text()
    assert "loss=weighted_ce better than loss=ce by +0.2" in md and "(8/8 seeds, adjusted p = " in md
    assert "inconclusive against loss=ce (within ±0.02) at n = 8: loss=focal" in md
    starred = [line for line in md.splitlines() if "★" in line and line.startswith("| loss=")]
    assert len(starred) == 1 and starred[0].startswith("| loss=weighted_ce | 8 |")
    # Another baseline: everything is compared with focal instead.
    other = build_report(tmp_path, baseline="loss=focal")
    assert {c.baseline.label for c in other.comparisons.items} == {"loss=focal"}
    assert [g.label for g in report.groups if g.is_baseline] == ["loss=ce"]


def test_bad_metrics_files_are_listed_and_the_rest_reported_normally(tmp_path):
    for loss in ("ce", "focal"):
        for seed in range(2):
            write_job(tmp_path, [f"loss={loss}", f"seed={seed}"], completed(loss, seed, **{
                "test/balanced_accuracy": 0.5 + 0.1 * seed}))
    bad = {"list": "[]", "null": "null", "string": '"x"', "truncated": '{"status": "compl',
           "status_list": '{"status": ["completed"], "metrics": {}}',
           "string_metric": '{"status": "completed", "metrics": {"test/balanced_accuracy": "0.5"}}',
           "metrics_list": '{"status": "completed", "metrics": []}',
           "config_string": '{"status": "completed", "config": "seed=0"}',
           "overrides_string": '{"status": "completed", "overrides": "loss=ce"}',
           "bool_metric": '{"status": "completed", "metrics": {"test/balanced_accuracy": true}}',
           "binary": b"\xff\xfe\x00garbage", "deep_json": "[" * 100_000,
           "deep_config": '{"status": "completed", "config": ' + '{"a": ' * 40 + "1" + "}" * 41}
    for name, content in bad.items():
        job = tmp_path / f"bad_{name}"
        job.mkdir()
        (job / "metrics.json").write_bytes(content if isinstance(content, bytes) else content.encode())
    report = build_report(tmp_path)
    assert [g.label for g in report.groups] == ["loss=ce", "loss=focal"]  # not ~35 config keys
    assert {p.path.name: p.status for p in report.problems} == {
        f"bad_{n}": ("unreadable" if n in ("truncated", "binary", "deep_json") else "malformed") for n in bad}
    reasons = {p.path.name: p.error for p in report.problems}
    assert reasons["bad_list"] == "expected a JSON object, found a list"
    assert reasons["bad_string_metric"] == (
        "metric 'test/balanced_accuracy' should be a number, found a string")
    assert "'status' should be a string, found a list" == reasons["bad_status_list"]
    write_report(tmp_path)
    md = (tmp_path / "report.md").read_text()
    assert "| bad_list | malformed | expected a JSON object, found a list |" in md


def test_nested_seed_runs_warnings_and_equal_classes(tmp_path):
    for loss in ("ce", "focal"):
        for seed in range(2):
            record = completed(loss, seed, ratio=1, **{"test/balanced_accuracy": 0.5 + 0.1 * seed,
                                                       "test/minority_recall": 0.4})
            if loss == "focal" and seed == 1:
                record["warnings"] = ["loss never fell below epoch 1",
                                      {"rule": "loss", "epoch": 3}]
            write_job(tmp_path, [f"loss={loss}", "seeds=2", f"seed={seed}"], record, nested=f"seed={seed}")
    report = write_report(tmp_path)
    assert [len(g.runs) for g in report.groups] == [2, 2] and report.pending == [] and report.complete
    # Imbalance ratio 1: "minority recall" would name an arbitrary class, so it is not reported.
    assert [m.key for m in report.metrics] == ["test/balanced_accuracy"]
    md = (tmp_path / "report.md").read_text()
    warned = 'seed=1: loss never fell below epoch 1; {"epoch": 3, "rule": "loss"}'
    assert warned in md
    assert not (tmp_path / "report_metric_vs_ratio.png").exists()  # one ratio: no trend to plot


def test_seed_only_sweep_names_its_loss(tmp_path):
    for seed in range(2):
        write_job(tmp_path, [f"seed={seed}"], completed("focal", seed, **{"test/balanced_accuracy": 0.5}))
    report = build_report(tmp_path)
    assert [g.label for g in report.groups] == ["loss=focal"] and report.comparisons.items == []


def write_multirun(sweep: Path, params: dict, task: list[str]) -> None:
    config = {"hydra": {"sweeper": {"_target_": "hydra._internal.core_plugins.basic_sweeper.BasicSweeper",
                                    "params": params}, "overrides": {"task": task}},
              "report": {"baseline": "loss=focal"}}
    (sweep / "multirun.yaml").write_text(yaml.safe_dump(config))


def test_partial_sweep_lists_jobs_that_never_started_and_exits_nonzero(tmp_path, capsys):
    write_multirun(tmp_path, {"loss": "ce,focal"}, ["seed=range(0,3)", "data.imbalance_ratio=10"])
    for loss, seeds in (("ce", (0, 1, 2)), ("focal", (0,))):
        for seed in seeds:
            write_job(tmp_path, [f"loss={loss}", f"seed={seed}", "data.imbalance_ratio=10"],
                      completed(loss, seed, **{"test/balanced_accuracy": 0.5}))
    (tmp_path / "data.imbalance_ratio=10,loss=focal,seed=1" / ".hydra").mkdir(parents=True)
    (tmp_path / "data.imbalance_ratio=10,loss=focal,seed=1" / ".hydra" / "overrides.yaml").write_text(
        yaml.safe_dump(["loss=focal", "seed=1", "data.imbalance_ratio=10"]))
    report = build_report(tmp_path)
    assert report.unstarted == [{"loss": "focal", "seed": "2", "data.imbalance_ratio": "10"}]
    assert [p.name for p in report.pending] == ["data.imbalance_ratio=10,loss=focal,seed=1"]
    # The baseline the sweep was launched with (report.baseline in multirun.yaml).
    assert {c.baseline.label for c in report.comparisons.items} == {"loss=focal"}
    assert cli.main(["report", str(tmp_path)]) == 1
    assert "incomplete" in capsys.readouterr().err
    # Another baseline into the same folder would replace that report: refused, then allowed by name.
    before = (tmp_path / "report.md").read_bytes()
    assert cli.main(["report", str(tmp_path), "--allow-partial", "--baseline", "loss=ce"]) == 2
    assert 'other options (baseline "loss=focal" → "loss=ce")' in capsys.readouterr().err
    assert (tmp_path / "report.md").read_bytes() == before
    assert cli.main(["report", str(tmp_path), "--allow-partial", "--baseline", "loss=ce", "--overwrite"]) == 0
    md = (tmp_path / "report.md").read_text()
    assert "## Never started (planned in multirun.yaml)" in md
    assert "- loss=focal, seed=2, data.imbalance_ratio=10" in md


def test_planned_grid_is_parsed_never_executed(tmp_path):
    # An interpolation or resolver call in multirun.yaml is text to the report.
    write_multirun(tmp_path, {"loss": "ce"}, ["seed=0", "x=${oc.env:HOME}"])
    write_job(tmp_path, ["loss=ce", "seed=0", "x=${oc.env:HOME}"], completed("ce", 0, **{"test/ece": 0.1}))
    assert build_report(tmp_path).unstarted == []


def test_empty_folder_and_unwritable_folder(tmp_path, capsys):
    assert cli.main(["report", str(tmp_path)]) == 2
    assert "no runs under" in capsys.readouterr().err
    assert not (tmp_path / "report.md").exists()
    assert cli.main(["report", str(tmp_path / "nope")]) == 2
    assert "does not exist" in capsys.readouterr().err
    synthetic_sweep(tmp_path)
    (tmp_path / "comparisons.csv").mkdir()  # the first file cannot be renamed into place, even as root
    with pytest.raises(ReportWriteError, match="could not write the report into"):
        write_report(tmp_path)
    assert "loss=focal" in capsys.readouterr().out  # the table was printed first
    assert cli.main(["report", str(tmp_path), "--allow-partial"]) == 1
    assert "could not write the report" in capsys.readouterr().err
    assert not list(tmp_path.glob(".*.tmp")) and not (tmp_path / "report.md").exists()


def test_epochs_to_threshold():
    assert epochs_to_threshold([0.2, 0.5, 0.7, 0.9, 0.8]) == 3  # 0.8 · 0.8 = 0.64, first reached at epoch 3
    assert epochs_to_threshold([0.9, 0.95]) == 1
    assert math.isnan(epochs_to_threshold([0.3, 0.0]))


def test_convergence_section_reads_event_files(tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    curves = {"ce": [0.3, 0.7, 0.8, 0.82, 0.85], "mse": [0.2, 0.3, 0.45, 0.7, 0.85]}
    for loss, curve in curves.items():
        for seed in range(2):
            run = write_job(tmp_path, [f"loss={loss}", f"seed={seed}"], completed(loss, seed, **{
                "test/balanced_accuracy": curve[-1]}))
            with SummaryWriter(str(run)) as writer:
                for epoch, value in enumerate(curve):
                    writer.add_scalar("val/balanced_accuracy", value, (epoch + 1) * 7)
    report = write_report(tmp_path)
    rows = {g.label: s for g, s, _ in report.convergence.rows}
    assert rows["loss=ce"].mean == 2 and rows["loss=mse"].mean == 4  # 0.8 · 0.85 = 0.68
    md = (tmp_path / "report.md").read_text()
    assert "## Convergence" in md and "| loss=mse | 4.0 (all 2 equal) | 5 |" in md


def test_class_axis_says_majority_only_where_it_is():
    from xentlab.lab.report import class_axis_label
    from xentlab.lab.report.compare import Group
    from xentlab.lab.report.sweep import Run

    def group(data: dict) -> Group:
        return Group({}, "loss=ce", "", [Run(Path("x"), "completed", {}, {"data": data}, None)], {}, [])

    assert class_axis_label([group({"name": "classification", "imbalance_ratio": 10, "counts": None})]) \
        == "class (0 = majority, sizes fall with the index)"
    assert class_axis_label([group({"name": "multilabel", "n_classes": 8})]) == "label"
    assert class_axis_label([group({"name": "classification", "imbalance_ratio": 1})]) == "class"
    assert class_axis_label([group({"name": "blobs", "imbalance_ratio": 10, "counts": [5, 50]})]) == "class"


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0,
                    reason="root writes into read-only folders; the directory-in-the-way case covers it")
def test_read_only_sweep_folder_prints_then_fails_clearly(tmp_path, capsys):
    synthetic_sweep(tmp_path)
    tmp_path.chmod(0o555)
    try:
        assert cli.main(["report", str(tmp_path), "--allow-partial"]) == 1
    finally:
        tmp_path.chmod(0o755)
    captured = capsys.readouterr()
    assert "loss=focal" in captured.out and "could not write the report" in captured.err
    assert not (tmp_path / "report.md").exists()


@pytest.fixture
def small_tmpfs(tmp_path):
    """A 1 MiB tmpfs mounted at a temporary folder; skipped where this process may not mount one."""
    import shutil
    import subprocess

    point = tmp_path / "tmpfs"
    point.mkdir()
    mount = shutil.which("mount")
    done = mount and subprocess.run([mount, "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(point)],
                                    capture_output=True).returncode == 0
    if not done:
        pytest.skip("cannot mount a tmpfs here (needs root or CAP_SYS_ADMIN)")
    yield point
    subprocess.run(["umount", str(point)], check=True)


def test_full_and_read_only_disks_print_the_table_then_fail_without_leftovers(small_tmpfs, capsys):
    import subprocess

    synthetic_sweep(small_tmpfs)
    with (small_tmpfs / "filler").open("wb", buffering=0) as filler:  # fill the disk to the last byte
        for size in (4096, 1):
            try:
                while True:
                    filler.write(b"\0" * size)
            except OSError:
                pass
    assert cli.main(["report", str(small_tmpfs), "--allow-partial"]) == 1
    captured = capsys.readouterr()
    assert "loss=focal" in captured.out and "No space left on device" in captured.err
    names = {p.name for p in small_tmpfs.iterdir() if p.is_file()}
    assert names == {"filler"}  # no report file, truncated or whole, and no staging file
    (small_tmpfs / "filler").unlink()
    subprocess.run(["mount", "-o", "remount,ro", str(small_tmpfs)], check=True)
    assert cli.main(["report", str(small_tmpfs), "--allow-partial"]) == 1
    assert "Read-only file system" in capsys.readouterr().err
