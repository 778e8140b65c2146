"""hydra/launcher=slurm's request, fitted to the run and checked against a cluster's nodes as sinfo lists them (the
cluster itself: tests/test_slurm.py)."""

import re

import pytest

from mlplab.sweeps.slurm import Node, SlurmError, fitted_request, gpus_in, rank_tasks

LAUNCHER = {"tasks_per_node": 1, "nodes": 1, "gpus_per_node": None, "cpus_per_task": None, "mem_gb": None}
CPU_NODES = [Node("c1", "cpu*", 64, 257_000, 0), Node("c2", "cpu*", 32, 128_000, 0)]
GPU_NODES = [Node("g1", "gpu", 32, 512_000, 4), Node("g2", "gpu", 96, 1_024_000, 8)]


@pytest.mark.parametrize(
    ("gres", "gpus"), [("(null)", 0), ("gpu:4", 4), ("gpu:a100:8(S:0-1)", 8), ("gpu:a100:2,gpu:v100:2", 4)]
)
def test_gpus_are_read_from_sinfos_generic_resources(gres, gpus):
    assert gpus_in(gres) == gpus


def test_a_cpu_run_asks_for_a_nodes_cores_4_gb_and_no_gpu():
    request = fitted_request(LAUNCHER, "cpu", 1, CPU_NODES)
    assert (request["cpus_per_task"], request["mem_gb"], request["gpus_per_node"]) == (64, 4, 0)


def test_a_gpu_run_asks_for_its_devices_up_to_8_cores_and_16_gb():
    request = fitted_request(LAUNCHER, "gpu", 2, GPU_NODES)
    assert (request["cpus_per_task"], request["mem_gb"], request["gpus_per_node"]) == (8, 16, 2)


def test_a_data_parallel_run_is_one_task_per_rank_on_one_node_and_each_rank_gets_its_share_of_the_cores():
    assert rank_tasks(None, 1, 4, data_parallel=True) == 4 and rank_tasks(None, 1, 1, data_parallel=False) == 1
    request = fitted_request({**LAUNCHER, "tasks_per_node": 4}, "gpu", 4, GPU_NODES)
    assert (request["cpus_per_task"], request["mem_gb"], request["gpus_per_node"]) == (8, 64, 4)
    request = fitted_request({**LAUNCHER, "tasks_per_node": 2}, "cpu", 2, CPU_NODES)
    assert (request["cpus_per_task"], request["mem_gb"], request["gpus_per_node"]) == (32, 8, 0)


@pytest.mark.parametrize(
    ("tasks", "nodes", "devices", "data_parallel", "message"),
    [
        (2, 1, 1, False, "hydra.launcher.tasks_per_node=2: a one-device run is 1 SLURM task(s) per node"),
        (1, 1, 2, True, "hydra.launcher.tasks_per_node=1: trainer.devices=2 with trainer=ddp is 2 SLURM task(s)"),
        (None, 2, 2, True, "hydra.launcher.nodes=2: each of mlplab's SLURM jobs runs on one node (a data-parallel"),
        (None, 3, 1, False, "hydra.launcher.nodes=3: each of mlplab's SLURM jobs runs on one node"),
    ],
)
def test_tasks_that_are_not_one_per_rank_are_refused(tasks, nodes, devices, data_parallel, message):
    with pytest.raises(SlurmError, match=re.escape(message)):
        rank_tasks(tasks, nodes, devices, data_parallel)


@pytest.mark.parametrize(
    ("settings", "device", "nodes", "message"),
    [
        ({}, "gpu", CPU_NODES, "hydra.launcher.gpus_per_node=1: the nodes of partition cpu have at most 0 GPUs"),
        ({"gpus_per_node": 16}, "gpu", GPU_NODES, "have at most 8 GPUs; set trainer.devices=8"),
        ({"cpus_per_task": 128}, "cpu", CPU_NODES, "needs 128 CPUs; the nodes of partition cpu have at most 64"),
        ({"mem_gb": 2000}, "cpu", CPU_NODES, "hydra.launcher.mem_gb=2000: the nodes of partition cpu have at most 250"),
        # 64 cores: only c1 (250 GB); 300 GB: only c3 (16 cores); both together: no node
        (
            {"cpus_per_task": 64, "mem_gb": 300},
            "cpu",
            [*CPU_NODES, Node("c3", "cpu*", 16, 1_000_000, 0)],
            "no node of partition cpu has 64 CPUs, 300 GB and 0 GPUs together (c1: 64 CPUs, 250 GB, 0 GPUs,",
        ),
    ],
)
def test_a_request_no_node_can_hold_names_the_setting(settings, device, nodes, message):
    with pytest.raises(SlurmError, match=re.escape(message)):
        fitted_request({**LAUNCHER, **settings}, device, 1, nodes)
