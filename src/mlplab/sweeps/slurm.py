"""SLURM as mlplab's launcher (``hydra/launcher=slurm``) meets it: what the cluster's nodes have, a job's request
fitted to the run and checked against them before anything is submitted, and which of a sweep's jobs are still in
the queue. Through the scheduler's own commands (sinfo, squeue): on a cluster without accounting (no slurmdbd),
sacct answers nothing, while the queue is always there to read.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlplab.errors import MlplabError
from mlplab.files import write_text_atomically

# What a job asks for when its settings are null (conf/hydra/launcher/slurm.yaml): per task (one task per rank).
CPUS_PER_GPU_TASK = 8  # a GPU rank's data work is light (mlplab keeps batches in memory): up to 8 cores
MEM_GB_PER_TASK = {"cpu": 4, "gpu": 16}  # a CPU run of the default network peaks near 1.5 GB; a GPU rank holds CUDA


class SlurmError(MlplabError):
    """A request the cluster cannot satisfy, or a submission it refused: one line, nothing (more) submitted."""


@dataclass(frozen=True)
class Node:
    name: str  # named in a refusal
    partition: str
    cpus: int
    memory_mb: int
    gpus: int


def _run(command: list[str]) -> str:
    if shutil.which(command[0]) is None:
        raise SlurmError(
            f"hydra/launcher=slurm: {command[0]} is not on the PATH; run the sweep where SLURM jobs can be submitted "
            "(a login node of the cluster)"
        )
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        reason = " ".join(result.stderr.split()) or f"exit status {result.returncode}"
        raise SlurmError(f"hydra/launcher=slurm: {' '.join(command[:2])} failed: {reason}")
    return result.stdout


def gpus_in(gres: str) -> int:
    """GPUs in sinfo's generic resources, e.g. ``gpu:4``, ``gpu:a100:4(S:0-1)``, ``(null)``."""
    return sum(int(match) for match in re.findall(r"gpu(?::[^:,(]+)?:(\d+)", gres))


def cluster_nodes(partition: str | None) -> list[Node]:
    """The nodes of ``partition`` (None: the cluster's default partition), from sinfo."""
    lines = _run(["sinfo", "--noheader", "--Node", "--format=%N|%P|%c|%m|%G"]).splitlines()
    nodes = []
    for line in lines:
        name, part, cpus, memory, gres = line.strip().split("|")
        nodes.append(Node(name, part, int(cpus.rstrip("+")), int(memory.rstrip("+")), gpus_in(gres)))
    chosen = [n for n in nodes if (n.partition.rstrip("*") == partition if partition else n.partition.endswith("*"))]
    if not chosen:
        names = ", ".join(sorted({n.partition.rstrip("*") for n in nodes})) or "none"
        wanted = f"hydra.launcher.partition={partition}" if partition else "hydra.launcher.partition=null"
        raise SlurmError(f"{wanted}: no such partition (or no default one); the cluster has: {names}")
    return chosen


def rank_tasks(tasks_per_node: int | None, nodes: int, devices: int, data_parallel: bool) -> int:
    """SLURM tasks per node for a run: one per rank of a data-parallel run (``trainer.devices``), which Lightning
    then reads from SLURM; one for any other run. ``tasks_per_node``: the launcher's setting (None: from the run)."""
    wanted = devices if data_parallel else 1
    if tasks_per_node is not None and tasks_per_node != wanted:
        run = f"trainer.devices={devices} with trainer=ddp" if data_parallel else "a one-device run"
        raise SlurmError(
            f"hydra.launcher.tasks_per_node={tasks_per_node}: {run} is {wanted} SLURM task(s) per node, one per "
            f"rank; set hydra.launcher.tasks_per_node=null (from the run)"
        )
    if nodes != 1:
        raise SlurmError(
            f"hydra.launcher.nodes={nodes}: each of mlplab's SLURM jobs runs on one node (a data-parallel job's ranks "
            "are that node's tasks); set hydra.launcher.nodes=1"
        )
    return wanted


def fitted_request(params: dict[str, Any], device: str, devices: int, nodes: list[Node]) -> dict[str, Any]:
    """``params`` (the launcher's settings) with the nulls filled in for the run (``device``: cpu or gpu;
    ``devices``: trainer.devices) and checked against ``nodes``: some node must hold the whole request. SlurmError
    names the setting that does not fit and what the nodes have."""
    request = dict(params)
    tasks = int(request["tasks_per_node"])
    if request.get("gpus_per_node") is None:
        request["gpus_per_node"] = devices if device == "gpu" else 0
    gpus = int(request["gpus_per_node"])
    partition = nodes[0].partition.rstrip("*")
    candidates = [node for node in nodes if node.gpus >= gpus]
    if not candidates:
        most = max(node.gpus for node in nodes)
        raise SlurmError(
            f"hydra.launcher.gpus_per_node={gpus}: the nodes of partition {partition} have at most {most} GPUs; "
            + ("use trainer=cpu, or another hydra.launcher.partition" if most == 0 else f"set trainer.devices={most}")
        )
    cpus = max(node.cpus for node in candidates)
    memory_gb = max(node.memory_mb for node in candidates) // 1024
    if request.get("cpus_per_task") is None:
        share = max(cpus // tasks, 1)
        request["cpus_per_task"] = min(share, CPUS_PER_GPU_TASK) if device == "gpu" else share
    if request.get("mem_gb") is None:
        request["mem_gb"] = max(min(MEM_GB_PER_TASK[device] * tasks, memory_gb), 1)
    wanted_cpus, wanted_gb = request["cpus_per_task"] * tasks, request["mem_gb"]
    if wanted_cpus > cpus:
        raise SlurmError(
            f"hydra.launcher.cpus_per_task={request['cpus_per_task']} for {tasks} task(s) per node needs "
            f"{wanted_cpus} CPUs; the nodes of partition {partition} have at most {cpus}; set "
            f"hydra.launcher.cpus_per_task={max(cpus // tasks, 1)} or less (or null: from the run)"
        )
    if wanted_gb > memory_gb:
        raise SlurmError(
            f"hydra.launcher.mem_gb={wanted_gb}: the nodes of partition {partition} have at most {memory_gb} GB; "
            f"set hydra.launcher.mem_gb={memory_gb} or less (or null: from the run)"
        )
    if not any(node.cpus >= wanted_cpus and node.memory_mb // 1024 >= wanted_gb for node in candidates):
        have = ", ".join(f"{n.name}: {n.cpus} CPUs, {n.memory_mb // 1024} GB, {n.gpus} GPUs" for n in candidates)
        raise SlurmError(
            f"no node of partition {partition} has {wanted_cpus} CPUs, {wanted_gb} GB and {gpus} GPUs together "
            f"({have}); lower hydra.launcher.cpus_per_task or hydra.launcher.mem_gb"
        )
    return request


# The states a job ends in (a requeued job passes through none of them: it goes back to PENDING).
ENDED = {
    "COMPLETED",
    "CANCELLED",
    "FAILED",
    "TIMEOUT",
    "NODE_FAIL",
    "OUT_OF_MEMORY",
    "BOOT_FAIL",
    "DEADLINE",
    "PREEMPTED",
}


def job_states(job_ids: list[str]) -> dict[str, str]:
    """The state (PENDING, RUNNING, COMPLETED, TIMEOUT, ...) of each of ``job_ids`` the controller still knows;
    ended jobs stay listed for a while (MinJobAge), then are absent."""
    if not job_ids:
        return {}
    # This user's jobs in any state, not --jobs=<ids> (refused for ids that have left) nor squeue's default states
    # (which leave out a job's end, and so why it ended).
    output = _run(["squeue", "--noheader", "--array", "--me", "--states=all", "--format=%i|%T"])
    states = dict(line.strip().split("|", 1) for line in output.splitlines() if "|" in line)
    return {job_id: states[job_id] for job_id in job_ids if job_id in states}


def queued(job_ids: list[str]) -> dict[str, str]:
    """The state (PENDING, RUNNING, ...) of each of ``job_ids`` still in the queue; jobs that left it are absent."""
    return {job_id: state for job_id, state in job_states(job_ids).items() if state not in ENDED}


SLURM_JOBS_FILE = "slurm_jobs.json"  # in a sweep folder: each job submitted to SLURM, its id and its overrides


def record_submitted(sweep_dir: Path, submitted: list[tuple[str, list[str]]]) -> None:
    """Add ``submitted`` (each job's SLURM id and overrides; a stack's jobs share one id) to the sweep's record."""
    path = sweep_dir / SLURM_JOBS_FILE
    entries = [*submitted_jobs(sweep_dir), *({"job_id": job_id, "overrides": o} for job_id, o in submitted)]
    write_text_atomically(path, json.dumps(entries, indent=1) + "\n")


def submitted_jobs(sweep_dir: Path) -> list[dict[str, Any]]:
    path = sweep_dir / SLURM_JOBS_FILE
    return json.loads(path.read_text()) if path.is_file() else []


def scheduler_states(sweep_dir: Path) -> dict[tuple[str, ...], tuple[str, str]]:
    """For each of the sweep's jobs still in SLURM's queue, by its overrides: (its SLURM job id, its state); empty
    for a sweep never submitted to SLURM, or where squeue cannot be run."""
    entries = submitted_jobs(sweep_dir)
    if not entries:
        return {}
    try:
        states = queued([entry["job_id"] for entry in entries])
    except SlurmError:
        return {}
    return {
        tuple(entry["overrides"]): (entry["job_id"], states[entry["job_id"]])
        for entry in entries
        if entry["job_id"] in states
    }
