"""A one-node SLURM cluster on this machine, for tests: munged, slurmctld and slurmd as child processes.

Everything lives in one folder (key, config, state, spool, logs, the munge socket); clients find it through
`SLURM_CONF`, set in `Cluster.env`. Needs root (slurmd runs jobs as their submitting user) and Debian's
`slurm-wlm` and `munge` packages, which `scripts/test.sh` installs when run as root on Debian.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "squeue", "scontrol", "scancel", "sinfo", "srun")


def unavailable() -> str | None:
    """Why no cluster can start here, or None."""
    missing = [name for name in (*DAEMONS, *CLIENTS) if shutil.which(name, path=_path()) is None]
    if missing:
        return (f"SLURM is not installed ({', '.join(missing)} missing); as root on Debian, "
                "scripts/test.sh installs it (apt-get install slurm-wlm munge)")
    if os.geteuid() != 0:
        return "a local SLURM cluster needs root (slurmd starts jobs as their user)"
    return None


def _path() -> str:
    return os.environ.get("PATH", "") + ":/usr/sbin:/sbin"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def slurm_conf(root: Path, host: str, cpus: int, memory_mb: int, socket_path: Path) -> str:
    """slurm.conf for one node with `cpus` cores and `memory_mb` MB, one `debug` partition, no accounting.
    linuxproc/none plugins: they need no cgroups, which a container rarely grants. A requeued job waits
    `cred_expire` seconds before it may start again (120 by default, 10 here) and the scheduler looks
    every 2 s (60 by default), so a requeue test takes seconds, not minutes."""
    return f"""\
ClusterName=xentlab
SlurmctldHost={host}
SlurmUser=root
SlurmdUser=root
SlurmctldPort={free_port()}
SlurmdPort={free_port()}
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={socket_path},cred_expire=10
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2,bf_interval=2
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
ReturnToService=2
KillWait=5
MinJobAge=600
SlurmdTimeout=60
InactiveLimit=0
NodeName={host} CPUs={cpus} RealMemory={memory_mb} State=UNKNOWN
PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP
"""


@dataclass
class Cluster:
    root: Path
    host: str
    cpus: int
    memory_mb: int
    env: dict[str, str]
    processes: dict[str, subprocess.Popen] = field(default_factory=dict)

    def run(self, *command: str, check: bool = True) -> str:
        """A SLURM client command against this cluster; its stdout."""
        result = subprocess.run(command, env=self.env, capture_output=True, text=True, timeout=30)
        if check and result.returncode != 0:
            raise RuntimeError(f"{' '.join(command)}: {result.stderr.strip()}\n{self.logs()}")
        return result.stdout

    def logs(self) -> str:
        logs = sorted(self.root.glob("*.log"))
        return "\n".join(f"--- {log.name} ---\n{log.read_text()[-2000:]}" for log in logs)

    def stop(self) -> None:
        """Each daemon by its PID: SIGTERM, then SIGKILL if it has not exited within 10 s."""
        for name in reversed(DAEMONS):
            process = self.processes.pop(name, None)
            if process is None or process.poll() is not None:
                continue
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def start(root: Path, cpus: int | None = None, memory_mb: int | None = None) -> Cluster:
    """munged, slurmctld and slurmd in the foreground as child processes, configured under `root`; returns
    once the node is idle. `cpus`, `memory_mb`: this machine's (nproc, 90% of MemTotal) by default."""
    root.mkdir(parents=True, exist_ok=True)
    root.chmod(0o755)  # munged refuses group/world-writable folders
    for sub in ("state", "spool", "munge"):
        (root / sub).mkdir(exist_ok=True)
    (root / "munge").chmod(0o700)
    host = socket.gethostname().split(".")[0]
    cpus = cpus or os.cpu_count() or 1
    if memory_mb is None:
        total_kb = int(next(line for line in Path("/proc/meminfo").read_text().splitlines()
                            if line.startswith("MemTotal")).split()[1])
        memory_mb = int(total_kb / 1024 * 0.9)
    key, sock = root / "munge" / "munge.key", root / "munge" / "munge.socket"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o400)
    conf = root / "slurm.conf"
    conf.write_text(slurm_conf(root, host, cpus, memory_mb, sock))
    env = {**os.environ, "SLURM_CONF": str(conf), "PATH": _path()}
    cluster = Cluster(root, host, cpus, memory_mb, env)
    commands = {
        "munged": ["munged", "--foreground", "--force", f"--key-file={key}", f"--socket={sock}",
                   f"--pid-file={root}/munge/munged.pid", f"--seed-file={root}/munge/munged.seed",
                   f"--log-file={root}/munged.log"],
        "slurmctld": ["slurmctld", "-D", "-i", "-f", str(conf)],
        "slurmd": ["slurmd", "-D", "-f", str(conf)],
    }
    try:
        for name, command in commands.items():
            log = open(root / f"{name}.out", "w")  # noqa: SIM115 (kept open by the child)
            cluster.processes[name] = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT,
                                                       start_new_session=True)
            if name == "munged":
                _wait(lambda: sock.exists(), 10, "munged's socket", cluster)
            if name == "slurmctld":
                _wait(lambda: cluster.run("sinfo", "-h", check=False) != "", 20, "slurmctld", cluster)
        _wait(lambda: cluster.run("sinfo", "-h", "-o", "%t").strip() == "idle", 30, "an idle node", cluster)
    except Exception:
        cluster.stop()
        raise
    return cluster


def _wait(ready, seconds: float, what: str, cluster: Cluster) -> None:
    deadline = time.time() + seconds
    while time.time() < deadline:
        for name, process in cluster.processes.items():
            if process.poll() is not None:
                output = (cluster.root / f"{name}.out").read_text()[-2000:]
                raise RuntimeError(f"{name} exited with {process.returncode}:\n{output}\n{cluster.logs()}")
        if ready():
            return
        time.sleep(0.2)
    raise RuntimeError(f"timed out after {seconds} s waiting for {what}\n{cluster.logs()}")


if __name__ == "__main__":  # a cluster by hand: python tests/slurm_cluster.py /tmp/cluster
    import sys

    reason = unavailable()
    if reason:
        sys.exit(reason)
    running = start(Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/xentlab-slurm"))
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # `kill <pid>` stops it too (a background job
    signal.signal(signal.SIGINT, lambda *_: sys.exit(0))   # of a script ignores SIGINT)
    print(f"export SLURM_CONF={running.env['SLURM_CONF']}  # Ctrl-C or kill {os.getpid()} stops the cluster",
          flush=True)
    try:
        signal.pause()
    finally:
        running.stop()
