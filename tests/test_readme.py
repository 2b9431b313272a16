"""README.md works as printed: its tour and its "Write your own loss" example are read out of the README
and run, so the two cannot drift apart.

What the tests add to the printed commands, and why: `trainer.max_epochs=1` on every training command
(the README's epochs would take minutes); on multiruns also `seed=0` and, for the imbalance sweep, a
smaller `data.n_samples` and one of its losses, and for Optuna two trials, so a sweep is a few jobs
instead of dozens; the sweep folder for `xentlab report outputs/multirun/<date>/<time>`; and the plugin
is installed with `pip --target` into a folder on PYTHONPATH instead of `pip install -e .` into the test
environment, which it would change for every later test.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
SHORT = ["trainer.max_epochs=1"]
SHORT_SWEEP = [*SHORT, "seed=0"]


def code_blocks(section: str) -> list[tuple[str, str]]:
    """(language, text) of every fenced code block under the README heading `## <section>`."""
    text = (ROOT / "README.md").read_text()
    body = re.split(r"^## ", text, flags=re.M)
    (part,) = [p for p in body if p.startswith(section + "\n")]
    return re.findall(r"^```(\w+)\n(.*?)^```", part, flags=re.M | re.S)


def commands(block: str) -> list[list[str]]:
    """The block's commands as argument lists, comments dropped."""
    return [args for line in block.splitlines() if (args := shlex.split(line, comments=True))]


def run(args: list[str], cwd: Path, *, pythonpath: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "PYTHONWARNINGS": "ignore",
           "COLUMNS": "200", "HYDRA_FULL_ERROR": "1"}
    if pythonpath is not None:
        env["PYTHONPATH"] = str(pythonpath)
    result = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    output = f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    assert result.returncode == 0, f"{shlex.join(args)} failed:\n{output}"
    return result


def shortened(args: list[str]) -> list[str]:
    if args[0] != "xentlab-train":
        return args
    if "-m" not in args:
        return [*args, *SHORT]
    if any(a.startswith("experiment=imbalance_sweep") for a in args):
        # Its val/test splits are balanced: 3000 samples leave the rarest class 12 to train on at ratio 100.
        # It trains 10 seeds per job as a seed batch; two keep the test short.
        return [*args, *SHORT_SWEEP, "data.n_samples=3000", "loss=ce", "seeds=2"]
    if "experiment=tune_focal" in args:
        return [*args, *SHORT_SWEEP, "hydra.sweeper.n_trials=2"]  # two Optuna trials, not twelve
    return [*args, *SHORT_SWEEP]


def test_the_tour_runs_as_printed(tmp_path):
    (block,) = [text for language, text in code_blocks("A tour") if language == "bash"]
    tour = commands(block)
    assert [args[0] for args in tour].count("xentlab-train") >= 4
    for args in tour:
        if args[:2] == ["xentlab", "report"]:
            assert args[2] == "outputs/multirun/<date>/<time>"
            args = [*args[:2], str(max(tmp_path.glob("outputs/multirun/*/*"))), *args[3:]]
        result = run(shortened(args), tmp_path)
        if args[:2] == ["xentlab", "losses"]:
            assert " focal " in result.stdout
    runs = [json.loads(p.read_text()) for p in tmp_path.glob("outputs/**/metrics.json")]
    assert runs and all(r["status"] == "completed" for r in runs)
    assert any(r["config"]["data"]["name"] == "digits" for r in runs)
    assert (max(tmp_path.glob("outputs/multirun/*/*")) / "report.md").is_file()
    (study,) = [p.parent for p in tmp_path.glob("outputs/multirun/*/*/optimization_results.yaml")]
    tuned = [p.parent.name for p in study.glob("*/metrics.json")]
    assert sorted(tuned) == ["trial=0", "trial=1"]  # Optuna's trials, named by number, not by gamma
    assert {"report.tex", "report.html", "runs.csv"} <= {p.name for p in (tmp_path / "paper").iterdir()}


def test_write_your_own_loss_runs_as_printed(tmp_path):
    project, site, elsewhere = tmp_path / "project", tmp_path / "site", tmp_path / "elsewhere"
    elsewhere.mkdir()
    blocks = code_blocks("Write your own loss")
    for language, text in blocks:
        if language != "bash":  # each file's first line names it: "# my_pkg/taylor.py" or "# <path>: why"
            path = project / text.splitlines()[0].removeprefix("# ").split(":")[0]
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
    (block,) = [text for language, text in blocks if language == "bash"]
    outputs = []
    for args in commands(block):
        if args[:3] == ["pip", "install", "-e"]:
            run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index",
                 "-q", "--target", str(site), args[3]], project)
        elif args[0] == "touch":
            run(args, project)
        else:
            outputs.append(run(shortened(args), elsewhere, pythonpath=site).stdout)
    listing = next(out for out in outputs if "xentlab losses" in out)
    (row,) = [line for line in listing.splitlines() if " taylor " in line]
    assert "multiclass, binary" in row and "order=2" in row and "my-pkg" in row
    assert any("6/6 checks passed" in out for out in outputs)
    runs = [json.loads(p.read_text())["config"]["loss"] for p in elsewhere.glob("outputs/*/*/metrics.json")]
    assert sorted(map(str, runs)) == sorted(map(str, [{"name": "taylor", "order": 3},
                                                      {"_target_": "my_pkg.taylor.TaylorCE",
                                                       "name": "my_pkg.taylor.TaylorCE", "order": 3}]))


def test_your_data_and_model_run_as_printed(tmp_path):
    blocks = code_blocks("Your data, your model")
    for language, text in blocks:
        if language == "python":  # each file's first line names it: "# my_model.py: why"
            (tmp_path / text.splitlines()[0].removeprefix("# ").split(":")[0]).write_text(text)
    (block,) = [text for language, text in blocks if language == "bash"]
    for args in commands(block):
        run(shortened([sys.executable, *args[1:]] if args[0] == "python" else args), tmp_path)
    runs = [json.loads(p.read_text()) for p in tmp_path.glob("outputs/**/metrics.json")]
    assert len(runs) == 1 + 2 * 5 and all(r["status"] == "completed" for r in runs)
    assert all(r["config"]["data"]["path"] == "my_data.csv" for r in runs)
    assert sum(r["config"]["model"].get("_target_") == "my_model.Net" for r in runs) == 10
    (single,) = [p.parent for p in tmp_path.glob("outputs/*/*/metrics.json") if "multirun" not in str(p)]
    assert (single / "metrics.csv").is_file()  # logger=csv
    report = (max(tmp_path.glob("outputs/multirun/*/*")) / "report.md").read_text()
    # Verdicts on the user's data: focal against CE over the five matched seeds of each.
    verdicts = report.split("## Verdicts", 1)[1].split("\n## ", 1)[0]
    assert "loss=focal" in verdicts and "nothing to compare" not in verdicts and "no claim" not in verdicts
