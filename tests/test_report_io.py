"""The report's options, outputs and reading of untrusted folders, on synthetic sweep folders written here
(no training): --metrics, --format (LaTeX, an HTML page opened in headless Chromium), --out and its
refusal to replace a report of other options, runs.csv, the set-up section, the terminal table at 80-120
columns, one colour per loss, runs recorded twice, several sweeps, and hostile folders (size, kind, YAML
aliases, huge grids, numbers beyond float range, text that would break a table or a spreadsheet)."""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import yaml
from conftest import CHROMIUM_FLAGS
from test_report import write_job

from xentlab import cli
from xentlab.lab.report import DuplicateRuns, build_report, write_report
from xentlab.lab.report.figures import LOSS_COLOURS, loss_colour, plot_class_recall, plot_metric_vs_ratio
from xentlab.lab.report.options import Request

SEEDS = 5
CONFIG = {"data": {"name": "classification", "n_classes": 2, "n_samples": 2000, "eval_split": "balanced"},
          "model": {"name": "mlp", "hidden_sizes": [64, 64]}, "trainer": {"max_epochs": 30},
          "optimizer": {"_target_": "torch.optim.Adam", "lr": 0.003, "weight_decay": 0.0}}
VERSIONS = {"xentlab": "0.1.0", "torch": "2.13.0", "python": "3.11.7"}


def record(loss: str, seed: int, ratio, metrics: dict) -> dict:
    config = json.loads(json.dumps(CONFIG)) | {"seed": seed, "loss": {"name": loss}}
    config["data"]["imbalance_ratio"] = ratio
    return {"status": "completed", "metrics": metrics, "config": config, "versions": VERSIONS}


def sweep_of(folder: Path, losses=("ce", "focal"), ratios=(10, 100), *, extra: tuple = ()) -> Path:
    """losses × ratios × 5 seeds with a multirun.yaml; focal is clearly better on balanced accuracy, than
    CE and than CE + post-hoc adjustment."""
    task = [f"loss={','.join(losses)}", f"data.imbalance_ratio={','.join(map(str, ratios))}",
            f"seed=range(0,{SEEDS})", *extra]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "multirun.yaml").write_text(yaml.safe_dump({"hydra": {
        "sweeper": {"_target_": "hydra._internal.core_plugins.basic_sweeper.BasicSweeper", "params": None},
        "overrides": {"task": task}}, "report": {"baseline": "loss=ce"}}))
    for ratio in ratios:
        for i, loss in enumerate(losses):
            for seed in range(SEEDS):
                wobble = 0.01 * ((seed * 7 + i * 3) % 5)
                balanced = 0.6 + 0.3 * i / len(losses) + wobble + 0.002 * seed * i
                metrics = {"test/balanced_accuracy": balanced, "test/accuracy": 0.8 - wobble,
                           "test/la_balanced_accuracy": 0.65 + wobble, "test/ece": 0.1 + wobble,
                           "test/recall_class_0": 0.9 - wobble, "test/recall_class_1": 0.3 + 0.1 * i + wobble,
                           "test/minority_recall": 0.3 + 0.1 * i + wobble, "test/temperature": 1.2}
                overrides = [f"loss={loss}", f"data.imbalance_ratio={ratio}", f"seed={seed}", *extra]
                run = record(loss, seed, ratio, metrics)
                for override in extra:  # as Hydra would compose it into the run's config
                    (group, key), value = override.partition("=")[0].split("."), override.partition("=")[2]
                    run["config"].setdefault(group, {})[key] = yaml.safe_load(value)
                write_job(folder, overrides, run)
    return folder


@pytest.fixture(scope="module")
def sweep(tmp_path_factory) -> Path:
    return sweep_of(tmp_path_factory.mktemp("sweep"))


def rows(path: Path) -> list[dict]:
    with path.open() as file:
        return list(csv.DictReader(file))


# --- formats, --out, --metrics ------------------------------------------------------------------------------

def test_latex_html_and_tidy_runs_with_chosen_metrics(sweep, tmp_path, capsys):
    out = tmp_path / "paper"
    metrics = "test/balanced_accuracy,test/la_balanced_accuracy"
    assert cli.main(["report", str(sweep), "--out", str(out), "--format", "latex,html", "--metrics",
                     metrics, "--metric", "test/accuracy"]) == 0
    assert "written:" in capsys.readouterr().out
    assert {p.name for p in out.iterdir()} == {"report.tex", "report.html", "runs.csv", "report.csv",
                                                "comparisons.csv", "report.json", "rankings.csv",
                                                "aggregate.csv"}
    assert not (sweep / "report.json").exists()  # --out leaves the sweep folder alone

    tex = (out / "report.tex").read_text()
    body = [line for line in tex.splitlines() if not line.startswith("%")]
    assert "\\begin{tabular}{llrlll}" in tex and tex.count("\\begin{table}") == 1
    for rule in ("\\toprule", "\\midrule", "\\bottomrule", "\\end{tabular}", "\\end{table}"):
        assert rule in tex
    table_rows = [line for line in body if line.endswith("\\\\")]
    assert len(table_rows) == 1 + 6  # header, 2 ratios × (2 losses + CE after post-hoc adjustment)
    assert all(len(re.findall(r"(?<!\\)&", line)) == 5 for line in table_rows)
    assert "balanced acc after post-hoc LA $\\uparrow$" in table_rows[0] and "accuracy" in table_rows[0]
    focal = [line for line in table_rows if "loss=focal" in line]
    # With a long-tailed training split and a balanced test split the marks follow the stronger baseline,
    # CE + post-hoc adjustment, which focal beats too on balanced accuracy.
    assert len(focal) == 2 and all(line.count("$^{\\star}$") == 1 for line in focal)
    assert "data.imbalance\\_ratio=10 & loss=ce (baseline)" in tex and "95\\% CI" in tex
    assert sum(line.count("{") - line.count("\\{") for line in body) \
        == sum(line.count("}") - line.count("\\}") for line in body)
    assert "% seeds: 0–4 (5 seeds)" in tex and "% versions: python 3.11.7, torch 2.13.0, xentlab 0.1.0" in tex

    tidy = rows(out / "runs.csv")
    assert list(tidy[0]) == ["run", "data.imbalance_ratio", "loss", "seed", "group", "context", "metric",
                             "value"]
    assert len(tidy) == 2 * 2 * SEEDS * 8  # runs × recorded metrics
    one = {r["metric"]: float(r["value"]) for r in tidy
           if (r["loss"], r["data.imbalance_ratio"], r["seed"]) == ("focal", "100", "3")}
    assert one["test/balanced_accuracy"] == pytest.approx(0.796)

    compared = {r["metric"] for r in rows(out / "comparisons.csv")}
    assert compared >= {"test/balanced_accuracy", "test/la_balanced_accuracy", "test/accuracy"}
    assert "test/ece" not in compared  # only the chosen metrics


def test_the_html_page_opens_in_chromium_with_its_tables_and_plots(sweep, tmp_path, chromium):
    out = tmp_path / "html"
    write_report(sweep, request=Request.parse(None, "html"), out=out)
    page = (out / "report.html").read_text()
    assert "<script" not in page and "http://" not in page and "https://" not in page  # self-contained
    assert page.count('src="data:image/png;base64,') == 3  # metric vs ratio, class recall, CD diagram
    flags = [chromium, *CHROMIUM_FLAGS]
    dom = subprocess.run([*flags, "--dump-dom", (out / "report.html").as_uri()], capture_output=True,
                         text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    for text in ("<h2>Verdicts</h2>", "<h2>Results</h2>", "<h2>Set-up</h2>", "loss=ce (baseline)",
                 'class="value better">★', "<h2>Comparisons with the baseline</h2>", "<figcaption>"):
        assert text in dom.stdout, text
    shot = tmp_path / "page.png"
    subprocess.run([*flags, f"--screenshot={shot}", "--window-size=1200,6000",
                    (out / "report.html").as_uri()], capture_output=True, timeout=120, check=True)
    from matplotlib.image import imread

    pixels = (imread(shot)[..., :3] * 255).round().astype(int).reshape(-1, 3)
    # The plots drew in the page: focal's fixed orange is nowhere else on it (text is black, green, red).
    orange = tuple(int(LOSS_COLOURS["focal"][i:i + 2], 16) for i in (1, 3, 5))
    assert (abs(pixels - orange).max(axis=1) <= 8).sum() > 500


def test_out_never_replaces_a_report_of_other_options_silently(sweep, tmp_path, capsys):
    out = tmp_path / "out"
    assert cli.main(["report", str(sweep), "--out", str(out)]) == 0
    written = (out / "report.md").read_bytes()
    assert cli.main(["report", str(sweep), "--out", str(out)]) == 0  # the same report again: fine
    capsys.readouterr()
    assert cli.main(["report", str(sweep), "--out", str(out), "--metrics", "test/accuracy"]) == 2
    err = capsys.readouterr().err
    assert "holds a report made with other options (metrics" in err and "--overwrite" in err
    assert (out / "report.md").read_bytes() == written
    assert cli.main(["report", str(sweep), "--out", str(out), "--metrics", "test/accuracy",
                     "--overwrite"]) == 0
    assert "replacing the report" in capsys.readouterr().out
    assert "accuracy ↑" in (out / "report.md").read_text()


@pytest.mark.parametrize(("arguments", "message"), [
    (["--format", "pdf"], "unknown --format pdf; choose from md, csv, latex, html"),
    (["--metrics", "test/temperature"], "has no better or worse direction"),
    (["--metrics", "val/balanced_accuracy"], "--metrics takes test metrics"),
    (["--metrics", "test/balanced_acuracy"], "no completed run here recorded it; the test metrics recorded "
                                             "are test/accuracy, test/balanced_accuracy"),
])
def test_bad_options_are_one_line_before_any_work(sweep, tmp_path, capsys, arguments, message):
    assert cli.main(["report", str(sweep), "--out", str(tmp_path / "x"), *arguments]) == 2
    captured = capsys.readouterr()
    assert message in captured.err and captured.out == "" and not (tmp_path / "x").exists()


def test_setup_section_says_what_was_run(sweep, tmp_path):
    write_report(sweep, out=tmp_path)
    md = (tmp_path / "report.md").read_text()
    setup = md.split("## Set-up")[1].split("## Verdicts")[0]
    for line in ("| data | name=classification, n_classes=2, n_samples=2000, imbalance_ratio={10, 100}, "
                 "eval_split=balanced |", "| model | name=mlp, hidden_sizes=[64, 64] |",
                 "| epochs | max_epochs=30 |", "| optimizer | Adam, lr=0.003, weight_decay=0.0 |",
                 "| seeds | 0–4 (5 seeds) |", "| versions | python 3.11.7, torch 2.13.0, xentlab 0.1.0 |",
                 "| command | xentlab-train -m loss=ce,focal data.imbalance_ratio=10,100 "
                 "'seed=range(0,5)' |"):
        assert line in setup, line


# --- the terminal table -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def wide_report(tmp_path_factory):
    """Six losses at two ratios, four metrics: far wider than 80 columns as one table."""
    folder = sweep_of(tmp_path_factory.mktemp("wide"), LOSSES, ratios=(1, 100))
    metrics = "test/balanced_accuracy,test/ece,test/accuracy,test/la_balanced_accuracy"
    return build_report(folder, request=Request.parse(metrics))


LOSSES = ("ce", "weighted_ce", "label_smoothing", "focal", "logit_adjusted", "mse")


@pytest.mark.parametrize("columns", [80, 100, 120])
@pytest.mark.parametrize("wide", [True, False])
def test_terminal_table_keeps_every_label_readable(wide_report, sweep, monkeypatch, columns, wide):
    from xentlab.lab.report.terminal import console_for_output, print_report

    metrics = "test/balanced_accuracy,test/ece,test/accuracy,test/la_balanced_accuracy"
    report = wide_report if wide else build_report(sweep, request=Request.parse(metrics))
    monkeypatch.setenv("COLUMNS", str(columns))  # as `COLUMNS=80 xentlab report DIR | less` sets it
    console = console_for_output()
    with console.capture() as captured:
        print_report(report, console)
    out = captured.get()
    lines = out.splitlines()
    assert max(len(line) for line in lines) <= columns
    table = [line for line in lines if line.startswith("│")]
    assert not any("…" in line for line in table)  # no cell cut short
    assert all(re.search(r"│ +\d+ │", line) for line in table)  # the n column: never zero width
    for loss in LOSSES if wide else ("ce", "focal"):  # each label whole on a row, never cut or wrapped
        assert any(f"│ loss={loss}" in line for line in table), (columns, loss)
    assert any("loss=ce (baseline)" in line for line in table)
    contexts = ("data.imbalance_ratio=1 ", "data.imbalance_ratio=100") if wide else \
        ("data.imbalance_ratio=10 ", "data.imbalance_ratio=100")
    for text in (*contexts, "balanced acc ↑", "ECE ↓", "accuracy ↑", "balanced acc after"):
        assert text in out, (columns, text)


# --- one colour per loss ----------------------------------------------------------------------------------

def test_each_loss_keeps_its_colour_and_the_baseline_is_marked(tmp_path):
    first = build_report(sweep_of(tmp_path / "a", ("ce", "focal")))
    second = build_report(sweep_of(tmp_path / "b", ("mse", "focal", "ce")), baseline="loss=mse")

    def colours(report) -> dict:
        from matplotlib.colors import to_hex

        figure = plot_metric_vs_ratio(report)
        found = {}
        for container in figure.axes[0].containers:  # one errorbar per line: its data line comes first
            line = container.lines[0]
            found[container.get_label()] = (to_hex(line.get_color()), line.get_linewidth())
        assert "95% confidence intervals" in " ".join(t.get_text() for t in figure.texts)
        return found

    a, b = colours(first), colours(second)
    assert a["loss=focal"][0] == b["loss=focal"][0] == LOSS_COLOURS["focal"]
    assert a["loss=ce (baseline)"][0] == b["loss=ce"][0] == LOSS_COLOURS["ce"]
    assert a["loss=ce (baseline)"][1] > a["loss=focal"][1] and b["loss=mse (baseline)"][1] > b["loss=ce"][1]
    bars = plot_class_recall(first)
    assert any("(baseline)" in t.get_text() for ax in bars.axes for t in ax.get_legend().get_texts())
    assert loss_colour("my_plugin_loss") == loss_colour("my_plugin_loss")
    assert loss_colour("my_plugin_loss") not in LOSS_COLOURS.values()


# --- runs recorded twice, several sweeps ---------------------------------------------------------------

def test_a_parent_of_two_copies_of_a_sweep_is_an_error_naming_both(sweep, tmp_path, capsys):
    parent = tmp_path / "multirun"
    shutil.copytree(sweep, parent / "10-00-00")
    shutil.copytree(sweep, parent / "11-00-00")
    with pytest.raises(DuplicateRuns) as error:
        build_report(parent)
    job = "data.imbalance_ratio=10,loss=ce,seed=0"
    assert f"{parent / '10-00-00' / job} and {parent / '11-00-00' / job}" in str(error.value)
    assert "20 run(s) recorded more than once" in str(error.value)
    assert cli.main(["report", str(parent)]) == 2
    assert "--dedupe first or --dedupe last" in capsys.readouterr().err

    report = build_report(parent, request=Request.parse(dedupe="last"))
    assert [len(g.runs) for g in report.trained] == [SEEDS] * 4  # not 10: each seed counted once
    assert all("11-00-00" in str(run.path) for g in report.groups for run in g.runs)
    write_report(parent, request=Request.parse(dedupe="first"), out=tmp_path / "out")
    md = (tmp_path / "out" / "report.md").read_text()
    assert "Read 2 sweeps: 10-00-00, 11-00-00." in md
    assert "20 run(s) recorded more than once (same configuration and seed); one copy of each kept " \
        "(--dedupe first, in path order):" in md
    assert f"- kept 10-00-00/{job}, left out 11-00-00/{job}\n" in md


def test_a_copied_job_folder_is_not_an_extra_seed(sweep, tmp_path):
    folder = tmp_path / "sweep"
    shutil.copytree(sweep, folder)
    job = "data.imbalance_ratio=100,loss=focal,seed=4"
    shutil.copytree(folder / job, folder / f"{job} (copy)")
    with pytest.raises(DuplicateRuns, match=re.escape(f"{folder / job} and {folder / job} (copy)")):
        build_report(folder)


def test_sweeps_of_different_seeds_merge_and_each_one_plans_its_own_grid(tmp_path):
    parent = tmp_path / "day"
    sweep_of(parent / "a", ratios=(10,))
    later = sweep_of(parent / "b", ratios=(10,), extra=("trainer.max_epochs=31",))
    shutil.rmtree(later / "data.imbalance_ratio=10,loss=focal,seed=2,trainer.max_epochs=31")
    report = build_report(parent)
    assert [p.name for p in report.sweeps] == ["a", "b"]
    assert report.unstarted == [{"loss": "focal", "data.imbalance_ratio": "10", "seed": "2",
                                 "trainer.max_epochs": "31"}]


# --- hostile folders ----------------------------------------------------------------------------------------

def hostile(folder: Path) -> dict[str, str]:
    """A small sweep plus one of each hostile thing; returns {what: the line the report must print}."""
    sweep_of(folder, ratios=(10,))
    bad = folder / "bad"
    bad.mkdir()
    (bad / "huge_int").mkdir()
    (bad / "huge_int" / "metrics.json").write_text(
        '{"status": "completed", "metrics": {"test/ece": 1' + "0" * 400 + "}}")
    infinite = record("mse", 0, 10**400, {"test/ece": 1e400, "test/balanced_accuracy": 0.5})
    (bad / "infinite").mkdir()
    infinite["overrides"] = ["loss=mse", "data.imbalance_ratio=10", "seed=0"]
    (bad / "infinite" / "metrics.json").write_text(json.dumps(infinite).replace("Infinity", "1e400"))
    (bad / "zero" / ".hydra").mkdir(parents=True)
    (bad / "zero" / ".hydra" / "overrides.yaml").symlink_to("/dev/zero")
    (bad / "fifo").mkdir()
    os.mkfifo(bad / "fifo" / "metrics.json")
    (bad / "large").mkdir()
    with (bad / "large" / "metrics.json").open("wb") as file:
        file.truncate(17 * 2**20)  # sparse: costs nothing to write
    (bad / "bomb" / ".hydra").mkdir(parents=True)
    bomb = ["a: &a [x, x, x, x, x, x, x, x, x, x]"]
    bomb += [f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join(['*' + chr(97 + i)] * 10)}]" for i in range(8)]
    (bad / "bomb" / ".hydra" / "overrides.yaml").write_text("\n".join(bomb) + "\n")
    (bad / "loop").symlink_to(bad)
    deep = bad / "/".join(["d"] * 30)
    deep.mkdir(parents=True)
    huge = folder / "huge"
    huge.mkdir()
    (huge / "multirun.yaml").write_text(yaml.safe_dump({"hydra": {
        "sweeper": {"_target_": "hydra._internal.core_plugins.basic_sweeper.BasicSweeper", "params": None},
        "overrides": {"task": ["seed=range(0,100000000)", "loss=ce,focal"]}}}))
    (folder / "aliases").mkdir()
    (folder / "aliases" / "multirun.yaml").write_text("\n".join(bomb) + "\nhydra: *i\n")
    return {"huge_int": "bad/huge_int | malformed | metric 'test/ece' is an integer of 401 digits, outside "
                        "the range of a float",
            "zero": "bad/zero/.hydra/overrides.yaml: a character device, not a regular file",
            "fifo": "bad/fifo | unreadable | a FIFO, not a regular file",
            "large": "bad/large | unreadable | 17825792 bytes, more than the 16777216 such a file may hold",
            "bomb": "bad/bomb/.hydra/overrides.yaml: YAML aliases (\\*name), which Hydra never writes",
            "deep": "more than 24 folders deep; not read",
            "huge": "huge/multirun.yaml: planned grid not expanded: the grid plans more than 10000 jobs",
            "aliases": "aliases/multirun.yaml: YAML aliases (\\*name), which Hydra never writes"}


def test_hostile_folder_is_reported_line_by_line_in_seconds(tmp_path, capsys):
    expected = hostile(tmp_path)
    started = time.perf_counter()
    assert cli.main(["report", str(tmp_path), "--allow-partial"]) == 0
    elapsed = time.perf_counter() - started
    assert elapsed < 10, elapsed
    printed = capsys.readouterr().out
    md = (tmp_path / "report.md").read_text()
    for what, line in expected.items():
        assert line in md, what
    assert "not read bad/zero/.hydra/overrides.yaml: a character device" in printed
    # The rest is reported as usual: both losses over 5 seeds, and the infinite run's finite metric.
    assert "| loss=focal | 5 |" in md and "| loss=ce (baseline) | 5 |" in md
    assert "| loss=mse | 1 |" in md


@pytest.mark.parametrize("evil", ["a\nb | c", "=HYPERLINK(\"http://x\",\"y\")", "<script>alert(1)</script>",
                                  "\x1b[2J\\input{/etc/passwd} $x$ %", "[link](javascript:x) *b* _i_ `c`"])
def test_override_text_cannot_break_a_table_a_spreadsheet_or_a_page(tmp_path, capsys, evil):
    for note in (evil, "plain"):
        for loss in ("ce", "focal"):
            for seed in range(2):
                overrides = [f"loss={loss}", f"note={note}", f"seed={seed}"]
                run = record(loss, seed, 10, {"test/balanced_accuracy": 0.5 + 0.1 * seed})
                run["config"]["note"] = note
                write_job(tmp_path / note.encode().hex(), overrides, run)
    write_report(tmp_path, request=Request.parse(None, "md,latex,html"), out=tmp_path / "out")
    printed = capsys.readouterr().out
    assert "\x1b[2J" not in printed
    out = tmp_path / "out"
    md = (out / "report.md").read_text().splitlines()
    table = [line for line in md if line.startswith("| note=")]
    assert len(table) == 4  # one line per group, however the text looks
    pipes = len(re.findall(r"(?<!\\)\|", md[md.index(table[0]) - 2]))  # the header's
    assert all(len(re.findall(r"(?<!\\)\|", line)) == pipes for line in table)
    assert not any("<script>" in line or re.search(r"(?<!\\)\]\(javascript", line) for line in md)
    for name in ("runs.csv", "report.csv"):
        for row in csv.reader((out / name).open()):
            assert not any(cell.startswith(("=", "+", "@")) for cell in row), row
            assert not any(cell.startswith("-") and not re.fullmatch(r"-[\d.e+-]+", cell) for cell in row)
    assert "'=HYPERLINK" in (out / "runs.csv").read_text() or "HYPERLINK" not in evil
    page = (out / "report.html").read_text()
    assert "<script>" not in page and "\x1b" not in page
    tex = [line for line in (out / "report.tex").read_text().splitlines() if not line.startswith("%")]
    assert not any("\\input{" in line or "\x1b" in line for line in tex)  # in comments it is only text
