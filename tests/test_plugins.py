"""A real third-party loss: examples/xentlab-plugin-example is pip-installed into this environment, then found
by `xentlab losses`, trained as `loss=poly2` (its YAML comes through its Hydra search-path plugin, so a
run that composes proves Hydra lists it among the loss choices), swept beside a built-in, and its own tests
(which use check_loss) pass."""

from __future__ import annotations

import fcntl
import hashlib
import importlib
import importlib.metadata
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import tomllib

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "xentlab-plugin-example"
DIST = "xentlab-plugin-example"
TINY = ["data.n_samples=600", "model.hidden_sizes=[16]", "trainer.max_epochs=1"]


def installed_matches_source() -> bool:
    """True when the installed distribution has the example's version, entry points and exact source files."""
    try:
        dist = importlib.metadata.distribution(DIST)
    except importlib.metadata.PackageNotFoundError:
        return False
    project = tomllib.loads((EXAMPLE / "pyproject.toml").read_text())["project"]
    wanted = {(group, name, value) for group, points in project["entry-points"].items()
              for name, value in points.items()}
    installed_points = {(e.group, e.name, e.value) for e in dist.entry_points}
    if dist.version != project["version"] or installed_points != wanted:
        return False
    sources = [p for p in (EXAMPLE / "src").rglob("*") if p.is_file() and "__pycache__" not in p.parts]
    for source in sources:
        installed = Path(dist.locate_file(source.relative_to(EXAMPLE / "src")))
        if not installed.is_file() or installed.read_bytes() != source.read_bytes():
            return False
    return True


@pytest.fixture(scope="session")
def installed_plugin(tmp_path_factory):
    """pip-installs the example (non-editable, from a copy, so the source tree stays clean) unless this exact
    version is installed already; a file lock keeps parallel test workers from installing at once."""
    # One lock per environment; hashlib, because str hashes differ between processes.
    environment = hashlib.sha1(sys.prefix.encode()).hexdigest()[:12]
    lock_path = Path(tempfile.gettempdir()) / f"xentlab-plugin-install-{environment}.lock"
    with open(lock_path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not installed_matches_source():
            copy = tmp_path_factory.mktemp("plugin") / EXAMPLE.name
            shutil.copytree(EXAMPLE, copy, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info", "build",
                                                                          "tests"))
            pip = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation",
                                  "--no-index", "--quiet", "--force-reinstall", str(copy)],
                                 capture_output=True, text=True, timeout=300)
            assert pip.returncode == 0, f"pip could not install {EXAMPLE}:\n{pip.stderr}"
        fcntl.flock(lock, fcntl.LOCK_UN)
    importlib.invalidate_caches()
    assert installed_matches_source()
    return DIST


def run(command: list[str], cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "HYDRA_FULL_ERROR": "0", "PYTHONWARNINGS": "ignore", "COLUMNS": "200"}
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def script(name: str) -> str:
    return str(Path(sys.executable).with_name(name))


def test_xentlab_losses_lists_the_plugin_with_its_distribution(installed_plugin, tmp_path):
    result = run([script("xentlab"), "losses"], tmp_path)
    assert result.returncode == 0, result.stderr
    (row,) = [line for line in result.stdout.splitlines() if " poly2 " in line]
    assert "multiclass, binary" in row and "epsilon1=1.0" in row and installed_plugin in row
    for name in ("ce", "weighted_ce", "label_smoothing", "focal", "bce", "mse"):
        assert f" {name} " in result.stdout
    assert "failed to load" not in result.stdout


def test_a_one_epoch_run_with_the_plugin_and_its_own_config(installed_plugin, tmp_path):
    result = run([script("xentlab-train"), "loss=poly2", "loss.epsilon2=2.5", *TINY], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    (metrics,) = tmp_path.glob("outputs/*/*/metrics.json")
    record = json.loads(metrics.read_text())
    assert record["status"] == "completed" and record["epochs"] == 1
    assert record["config"]["loss"] == {"name": "poly2", "epsilon1": 1.0, "epsilon2": 2.5}


def test_a_multirun_mixes_a_builtin_and_the_plugin(installed_plugin, tmp_path):
    result = run([script("xentlab-train"), "-m", "loss=ce,poly2", *TINY], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    records = [json.loads(p.read_text()) for p in tmp_path.glob("outputs/multirun/**/metrics.json")]
    assert sorted(r["config"]["loss"]["name"] for r in records) == ["ce", "poly2"]
    for record in records:
        assert record["status"] == "completed", record.get("error")
        assert math.isfinite(record["metrics"]["test/loss"])


def test_the_plugins_own_tests_pass(installed_plugin, tmp_path):
    result = run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(EXAMPLE / "tests")],
                 tmp_path)
    assert result.returncode == 0, result.stdout[-3000:]
    assert " passed" in result.stdout


# --- broken plugins ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def broken_plugins(tmp_path_factory) -> dict:
    """A distribution `brokenplug` (on PYTHONPATH, not installed) with two loss entry points, one whose
    module raises on import and one whose loss raises in `__init__`, and a Hydra plugin module that raises
    on import, in a folder of its own."""
    root = tmp_path_factory.mktemp("broken")
    losses, hydra = root / "losses", root / "hydra"
    (losses / "brokenplug-0.1.dist-info").mkdir(parents=True)
    (losses / "brokenplug-0.1.dist-info" / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: brokenplug\nVersion: 0.1\n")
    (losses / "brokenplug-0.1.dist-info" / "entry_points.txt").write_text(
        "[xentlab.losses]\nboom = brokenplug_import:Boom\nctor = brokenplug_ctor:Ctor\n")
    (losses / "brokenplug_import.py").write_text('raise RuntimeError("broken at import")\n')
    (losses / "brokenplug_ctor.py").write_text(
        "from torch import nn\n\n\nclass Ctor(nn.Module):\n    def __init__(self):\n"
        "        super().__init__()\n        raise RuntimeError('broken in __init__')\n")
    (hydra / "hydra_plugins").mkdir(parents=True)
    (hydra / "hydra_plugins" / "broken_module.py").write_text('raise RuntimeError("broken Hydra plugin")\n')
    return {"losses": str(losses), "hydra": str(hydra)}


def run_with(path: str | Path, command: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """`command` with `path` first on PYTHONPATH (plugins there, not installed)."""
    env = {**os.environ, "HYDRA_FULL_ERROR": "0", "PYTHONWARNINGS": "ignore", "COLUMNS": "200",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(path), os.environ.get("PYTHONPATH")]))}
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize(("loss", "said"), [
    ("boom", "loss 'boom' comes from the plugin brokenplug (boom = brokenplug_import:Boom), which failed to "
             "load: RuntimeError: broken at import"),
    ("ctor", "loss 'ctor' (plugin brokenplug) could not be built: RuntimeError: broken in __init__"),
])
def test_a_broken_plugins_loss_is_refused_in_one_line_naming_the_plugin(broken_plugins, tmp_path, loss, said):
    result = run_with(broken_plugins["losses"], [script("xentlab-train"), f"loss.name={loss}"], tmp_path)
    assert result.returncode == 2, result.stderr[-3000:]
    assert result.stderr == f"xentlab-train: {said}\n"
    assert not list(tmp_path.rglob("metrics.json"))


def test_other_losses_keep_working_beside_a_broken_plugin(broken_plugins, tmp_path):
    listed = run_with(broken_plugins["losses"], [script("xentlab"), "losses"], tmp_path)
    assert listed.returncode == 0 and " ce " in listed.stdout and " ctor " in listed.stdout, listed.stderr
    assert "boom = brokenplug_import:Boom" in listed.stdout and "broken at import" in listed.stdout
    result = run_with(broken_plugins["losses"], [script("xentlab-train"), "loss=focal", *TINY], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Traceback" not in result.stderr and result.stderr.count("skipping xentlab loss plugin") == 0
    (line,) = [line for line in result.stdout.splitlines() if "skipping xentlab loss plugin" in line]
    assert "'boom = brokenplug_import:Boom' from brokenplug: RuntimeError: broken at import" in line
    (metrics,) = tmp_path.glob("outputs/*/*/metrics.json")
    assert json.loads(metrics.read_text())["status"] == "completed"


def test_a_broken_hydra_plugin_module_is_one_line_naming_it(broken_plugins, tmp_path):
    result = run_with(broken_plugins["hydra"], [script("xentlab-train"), *TINY], tmp_path)
    assert result.returncode == 2, result.stderr[-3000:]
    assert result.stderr == ("xentlab-train: the Hydra plugin module hydra_plugins.broken_module fails to "
                             "import (RuntimeError: broken Hydra plugin); fix or uninstall the package that "
                             "installs it\n")


# --- a plugin registered by its entry point alone: no YAML, no Hydra search-path plugin ---------------------

HINGE = '''
import torch
from torch import nn


class SquaredHinge(nn.Module):
    """Multiclass squared hinge: sum over c != y of max(0, margin - z_y + z_c)^2."""

    def __init__(self, margin: float = 1.0, reduction: str = "mean"):
        super().__init__()
        self.margin, self.reduction = margin, reduction

    def forward(self, input, target):
        true = input.gather(1, target[:, None])
        rows = (self.margin - true + input).clamp_min(0).pow(2).scatter(1, target[:, None], 0).sum(1)
        return {"mean": rows.mean, "sum": rows.sum, "none": lambda: rows}[self.reduction]()


class ScaledCE(nn.Module):
    """Cross-entropy of scale * logits; `scale` has no default."""

    def __init__(self, *, scale: float, reduction: str = "mean"):
        super().__init__()
        self.scale, self.reduction = scale, reduction

    def forward(self, input, target):
        return torch.nn.functional.cross_entropy(self.scale * input, target, reduction=self.reduction)
'''


@pytest.fixture(scope="module")
def yamlless_site(tmp_path_factory) -> Path:
    """A folder holding a module and the dist-info of a distribution whose entry points name its two
    classes: what `pip install` of a two-file plugin (the module and pyproject.toml) leaves."""
    site = tmp_path_factory.mktemp("site")
    (site / "hinge_plugin.py").write_text(HINGE)
    info = site / "xentlab_hinge_plugin-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: xentlab-hinge-plugin\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[xentlab.losses]\nsquared_hinge = hinge_plugin:SquaredHinge\n"
                                           "scaled_ce = hinge_plugin:ScaledCE\n")
    return site


def test_a_plugin_without_a_yaml_trains_by_its_entry_point_name(yamlless_site, tmp_path):
    result = run_with(yamlless_site, [script("xentlab-train"), "loss=squared_hinge", "loss.margin=2", *TINY],
                      tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    (metrics,) = tmp_path.glob("outputs/*/*/metrics.json")
    record = json.loads(metrics.read_text())
    assert record["status"] == "completed" and record["epochs"] == 1, record.get("error")
    # Its config is its constructor's signature, defaults included.
    assert record["config"]["loss"] == {"name": "squared_hinge", "margin": 2, "reduction": "mean"}
    assert math.isfinite(record["metrics"]["test/loss"])


def test_help_and_a_mistyped_name_list_the_plugin_without_a_yaml(yamlless_site, tmp_path):
    helped = run_with(yamlless_site, [script("xentlab-train"), "--help"], tmp_path)
    assert helped.returncode == 0, helped.stderr[-3000:]
    (choices,) = [line for line in helped.stdout.splitlines() if line.startswith("loss: ")]
    assert "squared_hinge" in choices and "scaled_ce" in choices and "focal" in choices

    typo = run_with(yamlless_site, [script("xentlab-train"), "loss=squared_hing"], tmp_path)
    assert typo.returncode == 2
    assert typo.stderr.startswith("xentlab-train: loss=squared_hing: no such loss config; did you mean "
                                  "loss=squared_hinge?")


def test_a_parameter_without_default_must_be_set(yamlless_site, tmp_path):
    result = run_with(yamlless_site, [script("xentlab-train"), "loss=scaled_ce", *TINY], tmp_path)
    assert result.returncode == 2
    assert "loss 'scaled_ce' has no default for loss.scale: set loss.scale=<value>" in result.stderr
    assert not list(tmp_path.glob("outputs/**/metrics.json"))  # refused before anything ran


def test_only_losses_without_a_yaml_get_a_stored_config(installed_plugin, yamlless_site, tmp_path):
    # A stored config beside a YAML of the same name would make Hydra merge the two and warn. The configs
    # come from the distributions' metadata: starting xentlab-train imports neither a plugin nor torch.
    code = ("import sys, xentlab.train; from hydra.core.config_store import ConfigStore; "
            "print(' '.join(sorted(ConfigStore.instance().repo.get('loss', {})))); "
            "print(sorted({'torch', 'hinge_plugin'} & set(sys.modules)))")
    result = run_with(yamlless_site, [sys.executable, "-c", code], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    stored, imported = result.stdout.splitlines()
    assert stored.split() == ["scaled_ce.yaml", "squared_hinge.yaml"]  # not poly2, no built-in
    assert imported == "[]"
