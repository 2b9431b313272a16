"""Sweeps on a real one-node SLURM cluster (tests/slurm_cluster.py): `hydra/launcher=submitit_slurm`, quiet
without accounting, and a preempted job that is requeued and resumes from its checkpoint."""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest
import slurm_cluster
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from test_readme import code_blocks

from xentlab.lab.board import board_tag

pytestmark = pytest.mark.skipif(slurm_cluster.unavailable() is not None,
                                reason=str(slurm_cluster.unavailable()))

TINY = ["data.n_samples=400", "trainer.max_epochs=1", "model.hidden_sizes=[16]"]
SLURM = ["hydra/launcher=submitit_slurm", "hydra.launcher.partition=debug", "hydra.launcher.cpus_per_task=1",
         "hydra.launcher.mem_gb=1", "hydra.launcher.timeout_min=5"]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    running = slurm_cluster.start(tmp_path_factory.mktemp("slurm"))
    yield running
    running.stop()


def xentlab_train(cluster, args: list[str], cwd: Path, **popen) -> subprocess.Popen:
    script = Path(sys.executable).with_name("xentlab-train")
    env = {**cluster.env, "HYDRA_FULL_ERROR": "1", "PYTHONWARNINGS": "ignore"}
    return subprocess.Popen([str(script), "-m", *args], cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **popen)


def finish(process: subprocess.Popen, cluster, timeout: float = 240) -> str:
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        stdout, stderr = process.communicate()
        raise AssertionError(f"timed out\n{stdout[-3000:]}{stderr[-3000:]}\n{cluster.logs()}") from None
    assert process.returncode == 0, stdout[-3000:] + stderr[-3000:] + cluster.logs()
    return stdout + stderr


def test_slurm_sweep_runs_every_job_and_reports_quietly(cluster, tmp_path):
    output = finish(xentlab_train(cluster, [*TINY, *SLURM, "loss=ce,focal", "seed=0,1"], tmp_path), cluster)
    (sweep_dir,) = (tmp_path / "outputs" / "multirun").glob("*/*")
    assert len(list(sweep_dir.glob(".submitit/*/*_log.out"))) == 4  # four SLURM jobs ran
    runs = {p.parent.name: json.loads(p.read_text()) for p in sweep_dir.glob("*/metrics.json")}
    assert sorted((r["config"]["loss"]["name"], r["config"]["seed"]) for r in runs.values()) == [
        ("ce", 0), ("ce", 1), ("focal", 0), ("focal", 1)]
    assert all(r["status"] == "completed" and "test/balanced_accuracy" in r["metrics"] for r in runs.values())
    assert all(r["torch_threads"] == 1 for r in runs.values())  # cpus_per_task=1
    assert "sweep report" in output and "in 2 groups" in (sweep_dir / "report.md").read_text()
    # No sacct noise on a cluster without accounting; each job's own line, from its log, in job order.
    assert "sacct" not in output and "accounting storage is disabled" not in output, output
    lines = [line for line in output.splitlines() if line.startswith("[") and "/4] " in line]
    assert [line.split()[:2] for line in lines] == [
        ["[1/4]", "loss=ce,seed=0"], ["[2/4]", "loss=ce,seed=1"], ["[3/4]", "loss=focal,seed=0"],
        ["[4/4]", "loss=focal,seed=1"]], output


def train_loss_steps(run_dir: Path) -> list[int]:
    events = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    events.Reload()
    return [event.step for event in events.Scalars(board_tag("train/loss"))]


def test_preempted_job_is_requeued_and_resumes_from_its_checkpoint(cluster, tmp_path):
    """USR2 is the signal SLURM sends `signal_delay_s` before a job's time limit (submitit's
    `--signal=USR2@90`) and on preemption: submitit checkpoints and requeues the job, which resumes from
    `last.ckpt`. With a 5-minute limit submitit counts any signal as the time limit (it guarantees no job
    under 10 minutes), the case that needs `max_num_timeout` > 0 (Hydra's default 0 never requeues)."""
    epochs = 6
    args = ["data.n_samples=4000", f"trainer.max_epochs={epochs}", "model.hidden_sizes=[16]", *SLURM,
            "hydra.launcher.max_num_timeout=1"]
    process = xentlab_train(cluster, args, tmp_path)
    run_dir = None
    deadline = time.time() + 120
    while time.time() < deadline and process.poll() is None:
        found = list(tmp_path.glob("outputs/multirun/*/*/*/checkpoints/last.ckpt"))
        if found:
            run_dir = found[0].parent.parent
            break
        time.sleep(0.2)
    assert run_dir is not None, finish(process, cluster)
    (job_id,) = cluster.run("squeue", "--noheader", "--format=%i").split()
    cluster.run("scancel", "--signal=USR2", job_id)
    output = finish(process, cluster)

    record = json.loads((run_dir / "metrics.json").read_text())
    assert record["status"] == "completed" and record["epochs"] == epochs, record
    assert "Restarts=1" in cluster.run("scontrol", "show", "job", job_id)  # SLURM really requeued it
    logs = "".join(p.read_text() for p in run_dir.parent.glob(".submitit/*/*_log.*"))
    assert "Caught signal SIGUSR2" in logs and "this job is timed-out" in logs, logs[-3000:]
    assert "interrupted by" in logs, logs[-3000:]  # the first attempt recorded where it stopped
    # One curve, one point per epoch: the requeued run continued it instead of restarting or repeating.
    steps = train_loss_steps(run_dir)
    last = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)
    steps_per_epoch = last["global_step"] // epochs
    assert steps == [steps_per_epoch * (k + 1) - 1 for k in range(epochs)], steps
    # submitit's requeue is the only one: no Lightning auto-requeue (hpc_ckpt_*.ckpt) checkpoints.
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir())[-1] == "last.ckpt"
    assert not list(run_dir.rglob("hpc_ckpt_*")), list(run_dir.rglob("*"))
    assert "[1/1] " in output and "sacct" not in output
    # The preempted run is the run that was never stopped: the same job straight through, same numbers.
    straight = tmp_path / "straight"
    straight.mkdir()
    finish(xentlab_train(cluster, args, straight), cluster)
    (straight_dir,) = [p.parent.parent for p in straight.glob("outputs/multirun/*/*/*/checkpoints/last.ckpt")]
    assert json.loads((straight_dir / "metrics.json").read_text())["metrics"] == record["metrics"]
    reference = torch.load(straight_dir / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
    for name, value in reference.items():
        assert torch.equal(last["state_dict"][name], value), f"parameter {name} differs"


def test_readme_cluster_example_runs_as_printed(cluster, tmp_path):
    """README's SLURM sweep, plus one epoch on a small dataset: 2 jobs of 5 seeds each, threads from
    cpus_per_task."""
    (block,) = [text for _, text in code_blocks("On a SLURM cluster")]
    args = shlex.split(block.replace("\\\n", " "), comments=True)
    assert args[:2] == ["xentlab-train", "-m"]
    output = finish(xentlab_train(cluster, [*args[2:], *TINY], tmp_path), cluster)
    (sweep_dir,) = (tmp_path / "outputs" / "multirun").glob("*/*")
    assert len(list(sweep_dir.glob(".submitit/*/*_log.out"))) == 2  # one SLURM job per loss
    runs = [json.loads(p.read_text()) for p in sweep_dir.glob("*/seed=*/metrics.json")]
    assert sorted((r["config"]["loss"]["name"], r["config"]["seed"]) for r in runs) == [
        (loss, seed) for loss in ("ce", "focal") for seed in range(5)]
    assert all(r["status"] == "completed" and r["torch_threads"] == 2 for r in runs)  # cpus_per_task=2
    assert "sweep report" in output and "sacct" not in output
    assert "10 completed runs in 2 groups" in (sweep_dir / "report.md").read_text()


def test_ddp_over_two_slurm_tasks_shards_training_into_one_run(cluster, tmp_path):
    """docs/cluster.md's multi-node recipe on one node: `srun` starts 2 tasks, Lightning's SLURM environment
    makes them one DDP run (ranks from SLURM), each trains on its half of the data."""
    from hydra import compose, initialize_config_dir

    from xentlab.lab.data import build_datamodule
    from xentlab.train import CONFIG_DIR

    run_dir = tmp_path / "run"
    overrides = ["data.n_samples=400", "trainer.max_epochs=2", "model.hidden_sizes=[16]"]
    command = ["srun", "--nodes=1", "--ntasks-per-node=2", "--cpus-per-task=1", "--mem=2G",
               str(Path(sys.executable).with_name("xentlab-train")), "trainer=ddp", "trainer.accelerator=cpu",
               "trainer.devices=2", "trainer.num_nodes=1", *overrides, f"hydra.run.dir={run_dir}"]
    env = {**cluster.env, "PYTHONWARNINGS": "ignore"}
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    output = result.stdout + result.stderr
    assert "GLOBAL_RANK: 0, MEMBER: 1/2" in output and "GLOBAL_RANK: 1, MEMBER: 2/2" in output
    record = json.loads((run_dir / "metrics.json").read_text())
    assert record["status"] == "completed" and record["epochs"] == 2
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides)
    data = build_datamodule(seed=cfg.seed, **cfg.data)
    per_process = -(-len(data.splits["train"][1]) // 2)
    steps_per_epoch = -(-per_process // cfg.data.batch_size)
    last = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)
    assert last["global_step"] == 2 * steps_per_epoch  # each task ran its half of the training split
    assert not list(tmp_path.glob("*_1"))  # both tasks wrote into the one run folder
