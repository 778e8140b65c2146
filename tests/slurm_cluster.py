"""A real single-node SLURM cluster for the tests: munged as the munge user, slurmctld and slurmd as root, on
loopback, with their key, state, spool, logs and slurm.conf in a temporary folder (SLURM_CONF points at it), and
ports of their own. Debian's slurm-wlm and munge (.ci/run installs them)."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "squeue", "sinfo", "scontrol", "scancel")


def missing_binaries() -> list[str]:
    return [name for name in BINARIES if shutil.which(name) is None and not Path("/usr/sbin", name).exists()]


def why_not() -> str | None:
    """Why this machine cannot start the test cluster, or None."""
    if missing := missing_binaries():
        return (
            f"SLURM's binaries are not installed ({', '.join(missing)}; Debian: apt-get install slurm-wlm munge, as "
            ".ci/run does)"
        )
    if os.geteuid() != 0:
        return "the test cluster's daemons start as root (slurmctld, slurmd) and as the munge user: run as root"
    return None


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _binary(name: str) -> str:
    return shutil.which(name) or str(Path("/usr/sbin", name))


def _queue(env: dict[str, str]) -> str:
    return subprocess.run(["squeue", "--noheader"], capture_output=True, text=True, env=env).stdout.strip()


def _wait_for(check, seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.3)
    raise RuntimeError(f"the test cluster's {what} did not come up within {seconds} s")


@contextlib.contextmanager
def slurm_cluster() -> Iterator[dict[str, str]]:
    """Start the cluster; yields the environment its clients need (SLURM_CONF), and stops it afterwards."""
    root = Path(tempfile.mkdtemp(prefix="mlplab-slurm-"))
    root.chmod(0o755)  # the munge user reaches its socket through it
    socket_dir, key_dir = root / "munge", root / "munge-key"
    for folder in (socket_dir, key_dir):
        folder.mkdir()
        shutil.chown(folder, "munge", "munge")
    socket_dir.chmod(0o755)
    key_dir.chmod(0o700)
    key = key_dir / "munge.key"
    key.write_bytes(os.urandom(1024))
    shutil.chown(key, "munge", "munge")
    key.chmod(0o400)
    munge_socket = socket_dir / "munge.socket"
    env = {"SLURM_CONF": str(root / "slurm.conf")}
    client_env = {**os.environ, **env}
    pid_files = (root / "slurmd.pid", root / "slurmctld.pid", key_dir / "munged.pid")
    try:
        yield from _started(root, key, key_dir, munge_socket, client_env, env)
    finally:
        subprocess.run(["scancel", "--full", "--user=root"], env=client_env, capture_output=True)
        with contextlib.suppress(RuntimeError):  # the jobs' steps end before the daemons that would reap them
            _wait_for(lambda: not _queue(client_env), 20, "queue's end")
        for pid_file in pid_files:
            with contextlib.suppress(OSError, ValueError):
                os.kill(int(pid_file.read_text().strip()), 15)
        time.sleep(0.5)
        shutil.rmtree(root, ignore_errors=True)


def _started(
    root: Path, key: Path, key_dir: Path, munge_socket: Path, client_env: dict[str, str], env: dict[str, str]
) -> Iterator[dict[str, str]]:
    subprocess.run(
        [
            "runuser", "-u", "munge", "--", _binary("munged"), f"--socket={munge_socket}", f"--key-file={key}",
            f"--log-file={key_dir / 'munged.log'}", f"--pid-file={key_dir / 'munged.pid'}",
            f"--seed-file={key_dir / 'munged.seed'}",
        ],
        check=True,
    )  # fmt: skip
    for folder in ("state", "spool", "log"):
        (root / folder).mkdir()
    memory_mb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2**20 - 2048
    host = socket.gethostname()
    conf = root / "slurm.conf"
    conf.write_text(
        "\n".join(
            [
                "ClusterName=mlplabtest",
                f"SlurmctldHost={host}(127.0.0.1)",
                f"SlurmctldPort={_free_port()}",
                f"SlurmdPort={_free_port()}",
                "SlurmUser=root",
                "AuthType=auth/munge",
                "CredType=cred/munge",
                f"AuthInfo=socket={munge_socket}",
                f"StateSaveLocation={root / 'state'}",
                f"SlurmdSpoolDir={root / 'spool'}",
                f"SlurmctldPidFile={root / 'slurmctld.pid'}",
                f"SlurmdPidFile={root / 'slurmd.pid'}",
                f"SlurmctldLogFile={root / 'log' / 'slurmctld.log'}",
                f"SlurmdLogFile={root / 'log' / 'slurmd.log'}",
                "ProctrackType=proctrack/linuxproc",
                "TaskPlugin=task/none",
                "SelectType=select/cons_tres",
                "SelectTypeParameters=CR_Core_Memory",
                "MpiDefault=none",
                "ReturnToService=2",
                "AccountingStorageType=accounting_storage/none",  # no slurmdbd: sacct answers nothing
                "JobAcctGatherType=jobacct_gather/none",
                "SchedulerType=sched/backfill",
                "SchedulerParameters=sched_interval=2",
                "InactiveLimit=0",
                "MinJobAge=300",
                "KillWait=10",
                "Waittime=0",
                f"NodeName={host} NodeAddr=127.0.0.1 CPUs={os.cpu_count()} RealMemory={memory_mb} State=UNKNOWN",
                "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP",
                "",
            ]
        )
    )
    subprocess.run([_binary("slurmctld"), "-f", str(conf), "-i"], check=True, env=client_env)
    subprocess.run([_binary("slurmd"), "-f", str(conf)], check=True, env=client_env)

    def idle() -> bool:
        state = subprocess.run(["sinfo", "--noheader", "--format=%t"], capture_output=True, text=True, env=client_env)
        return state.stdout.strip() in ("idle", "mix", "alloc")

    _wait_for(idle, 30, "node")
    yield env
