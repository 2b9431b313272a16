"""A normal, non-editable install works: the wheel carries the configs, and its commands run from any folder.

The wheel is built from a copy of the source tree and installed into a fresh virtual environment. The
dependencies (torch, Lightning, Hydra, ...) come from this test environment through a `.pth` file rather
than a second multi-GB download; the test checks that it is the wheel's xentlab, not this environment's
editable one, that runs.
"""

from __future__ import annotations

import os
import shutil
import site
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SOURCES = ("pyproject.toml", "setup.py", "README.md", "xentlab", "conf")


def run(command: list[str], cwd: Path, timeout: float = 240, quiet_warnings: bool = True) \
        -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONWARNINGS")}
    env.update(COLUMNS="200", HYDRA_FULL_ERROR="1")
    if quiet_warnings:
        env["PYTHONWARNINGS"] = "ignore"
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{command} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


def copy_of_the_sources(source: Path) -> Path:
    source.mkdir()
    for name in SOURCES:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(ROOT / name, source / name)
    return source


@pytest.fixture(scope="module")
def wheel_env(tmp_path_factory) -> Path:
    """A fresh venv with the freshly built wheel installed (no dependencies of its own)."""
    tmp = tmp_path_factory.mktemp("install")
    source = copy_of_the_sources(tmp / "source")
    pip = [sys.executable, "-m", "pip"]
    # Built with Python's own warning filters, as `pip install .` builds it: setuptools reports what it
    # finds wrong in the packaging (a license table, config folders it is not told of) as warnings that
    # `-q` does not hide, a few hundred lines of them.
    built = run([*pip, "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q", "-w",
                 str(tmp / "dist"), str(source)], tmp, quiet_warnings=False)
    assert "Warning" not in built.stdout + built.stderr, built.stdout + built.stderr
    (wheel,) = (tmp / "dist").glob("xentlab-*.whl")
    venv = tmp / "venv"
    python = venv_with_our_dependencies(venv)
    run([*pip, "--python", str(python), "install", "--no-deps", "--no-index", "-q", str(wheel)], tmp)
    return venv


def venv_with_our_dependencies(venv: Path) -> Path:
    """A fresh venv (its python returned) that sees this environment's packages after its own."""
    run([sys.executable, "-m", "venv", "--without-pip", str(venv)], venv.parent)
    python = venv / "bin" / "python"
    purelib = Path(run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                       venv.parent).stdout.strip())
    # This environment's site-packages come after the venv's own: its dependencies, not its xentlab (an
    # editable install there is a .pth hook, which only runs in a site directory, not a .pth-added path).
    ours = dict.fromkeys([*site.getsitepackages(), sysconfig.get_paths()["purelib"]])
    (purelib / "xentlab-test-deps.pth").write_text("\n".join(ours) + "\n")
    return python


def test_an_editable_install_prints_nothing(tmp_path):
    """The set-up scripts install the clone editable with `pip -q`; a recent pip passes on setuptools'
    closing note about how an editable install links the sources, a dozen lines on every set-up."""
    source = copy_of_the_sources(tmp_path / "source")
    python = venv_with_our_dependencies(tmp_path / "venv")
    installed = run([sys.executable, "-m", "pip", "--python", str(python), "install",
                     "--no-deps", "--no-build-isolation", "--no-index", "-q", "-e", str(source)], tmp_path,
                    quiet_warnings=False)
    assert installed.stdout + installed.stderr == "", installed.stdout + installed.stderr


def test_the_wheel_is_what_runs_and_ships_the_configs(wheel_env, tmp_path):
    code = ("import xentlab; from xentlab.losses import build_loss; "
            "print(xentlab.__file__); print(xentlab.config_dir()); print(build_loss('focal').gamma)")
    module, conf, gamma = run([str(wheel_env / "bin" / "python"), "-c", code], tmp_path).stdout.split()
    assert Path(module).is_relative_to(wheel_env) and Path(conf).is_relative_to(wheel_env)
    assert (Path(conf) / "config.yaml").is_file() and (Path(conf) / "loss" / "focal.yaml").is_file()
    assert float(gamma) == 2.0  # the default from the shipped conf/loss/focal.yaml
    # Every package of the source tree is in the wheel (a subpackage left out would fail only on import).
    def packages(root: Path) -> set[Path]:
        return {p.parent.relative_to(root) for p in root.rglob("__init__.py")}

    assert packages(Path(module).parent) == packages(ROOT / "xentlab") | {Path("conf")}


def test_the_installed_commands_run_from_any_folder(wheel_env, tmp_path):
    listing = run([str(wheel_env / "bin" / "xentlab"), "losses"], tmp_path).stdout
    assert " focal " in listing and "gamma=2.0" in listing
    run([str(wheel_env / "bin" / "xentlab-train"), "trainer.max_epochs=1", "data.n_samples=400",
         "model.hidden_sizes=[16]"], tmp_path)
    (record,) = tmp_path.glob("outputs/*/*/metrics.json")
    assert '"status": "completed"' in record.read_text()


@pytest.mark.parametrize(("gpu_listed", "asked", "extras"), [
    (False, None, "sweep,mnist"),        # no CUDA: no Triton
    (True, None, "sweep,mnist,gpu"),     # nvidia-smi lists a GPU
    (False, "1", "sweep,mnist,gpu"),     # asked for
    (True, "0", "sweep,mnist"),          # refused
])
def test_the_scripts_install_triton_only_where_cuda_is(tmp_path, gpu_listed, asked, extras):
    """scripts/_setup.sh as demo.sh sources it, with a stand-in venv whose python records each pip call
    and an `nvidia-smi` that lists a GPU or fails as it does without one."""
    (tmp_path / "scripts").mkdir()
    shutil.copy2(ROOT / "scripts" / "_setup.sh", tmp_path / "scripts" / "_setup.sh")
    (tmp_path / "pyproject.toml").write_text("")
    bin_dir, tools = tmp_path / ".venv" / "bin", tmp_path / "tools"
    bin_dir.mkdir(parents=True)
    tools.mkdir()
    (bin_dir / "activate").write_text(f'PATH="{bin_dir}:$PATH"\n')
    (bin_dir / "python").write_text(f'#!/bin/sh\necho "$*" >> "{tmp_path / "calls"}"\n')
    # Without a GPU, nvidia-smi (where installed) fails; this one comes before any real one on PATH.
    listing = "echo 'GPU 0: NVIDIA H100'" if gpu_listed else "echo 'NVIDIA-SMI has failed' >&2; exit 9"
    (tools / "nvidia-smi").write_text(f"#!/bin/sh\n{listing}\n")
    for script in (bin_dir / "python", tools / "nvidia-smi"):
        script.chmod(0o755)
    env = {"PATH": f"{tools}:/usr/bin:/bin", "HOME": str(tmp_path)}
    if asked is not None:
        env["XENTLAB_GPU"] = asked
    result = subprocess.run(["bash", "-c", 'source scripts/_setup.sh "sweep,mnist"'], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    calls = (tmp_path / "calls").read_text().splitlines()
    assert calls[-2:] == ["-m pip install -q torch==2.13.0", f"-m pip install -q -e .[{extras}]"]
    assert (tmp_path / ".venv" / ".xentlab-installed").read_text().strip() == extras
