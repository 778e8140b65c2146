"""Sweeps on a real SLURM cluster (hydra/launcher=slurm): munged, slurmctld and slurmd started on this machine
(tests/slurm_cluster.py), jobs submitted with sbatch as a user's sweep submits them, followed through squeue; the
cluster has no accounting database, as many small clusters have not."""

import csv
import json
import os
import re
import shlex
import subprocess
import sys
import threading
import time
from pathlib import Path

import optuna
import pytest
import torch
from conftest import SYNTHETIC_RUN, cli_env, postgres_server, study_of
from slurm_cluster import slurm_cluster, why_not

from mlplab.sweeps.study import DUPLICATE_OF

pytestmark = pytest.mark.skipif(why_not() is not None, reason=why_not() or "")


@pytest.fixture(scope="module")
def cluster():
    with slurm_cluster() as env:
        yield env


def submit(forked_cli, cluster, tmp_path: Path, data_dir: Path, *overrides: str, seconds: int = 240):
    return forked_cli.run_apart(
        ["-m", "hydra/launcher=slurm", *SYNTHETIC_RUN, f"paths.data_dir={data_dir}", *overrides],
        tmp_path,
        "mlplab-train",
        cluster,
        seconds,
        [],
    )


def queue(cluster, format: str = "%i %T") -> str:
    env = {"SLURM_CONF": cluster["SLURM_CONF"], "PATH": os.environ["PATH"]}
    command = ["squeue", "--noheader", "--array", f"--format={format}"]
    return subprocess.run(command, capture_output=True, text=True, env=env).stdout.strip()


@pytest.mark.slow
def test_a_request_the_cluster_cannot_satisfy_is_one_line_and_nothing_is_submitted(
    forked_cli, cluster, synthetic_data_dir, tmp_path
):
    for overrides, message in (
        ("trainer=cpu hydra.launcher.cpus_per_task=64", "hydra.launcher.cpus_per_task=64 for 1 task(s) per node needs"),
        ("trainer=cpu hydra.launcher.mem_gb=100000", "hydra.launcher.mem_gb=100000: the nodes of partition debug"),
        ("trainer=cpu hydra.launcher.partition=gpu", "hydra.launcher.partition=gpu: no such partition"),
        ("trainer=gpu", "hydra.launcher.gpus_per_node=1: the nodes of partition debug have at most 0 GPUs"),
        (
            "trainer=ddp trainer.accelerator=cpu hydra.launcher.nodes=2",
            "hydra.launcher.nodes=2: each of mlplab's SLURM jobs runs on one node",
        ),
    ):
        code, out, err = submit(forked_cli, cluster, tmp_path, synthetic_data_dir, *overrides.split(), "sweep=no")
        (line,) = [line for line in err.splitlines() if line.startswith("mlplab-train: error:")]
        assert code == 2 and message in line and "Traceback" not in err, err[-2000:]
        assert not (tmp_path / "outputs" / "sweeps" / "no" / ".submitit").exists() and queue(cluster) == ""


def controller_log(cluster) -> str:
    """The end of slurmctld's log: what the scheduler did, for a failure's message."""
    return (Path(cluster["SLURM_CONF"]).parent / "log" / "slurmctld.log").read_text()[-4000:]


def pace(seconds: float, until_resumed: bool = False) -> str:
    return f"+callbacks.pace={{_target_:probes.PaceSteps,seconds:{seconds},until_resumed:{until_resumed}}}"


def release_requeued(cluster, until: Path) -> None:
    """Let a requeued job run again at once, as an administrator would: SLURM holds it back for a while first."""
    env = {"SLURM_CONF": cluster["SLURM_CONF"], "PATH": os.environ["PATH"]}
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not until.exists():
        lines = subprocess.run(
            ["squeue", "--noheader", "--array", "--format=%i|%T|%r"], capture_output=True, text=True, env=env
        ).stdout.split()
        for job_id, state, reason in (line.split("|") for line in lines):
            if state == "PENDING" and reason == "BeginTime":
                subprocess.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"], env=env, check=False)
        time.sleep(0.5)


def job_of(sweep_dir: Path, seed: int) -> Path:
    """The job folder of ``seed`` (long folder names end in a hash, not in their overrides)."""
    (job,) = [p.parent.parent for p in sweep_dir.glob("*/.hydra/overrides.yaml") if f"- seed={seed}\n" in p.read_text()]
    return job


@pytest.mark.slow
def test_a_cpu_sweep_runs_as_one_job_array_whose_preempted_and_time_limited_jobs_resume_to_uninterrupted_weights(
    forked_cli, cluster, synthetic_data_dir, tmp_path
):
    marker, done = tmp_path / "requeued", tmp_path / "done"
    jobs = ["trainer=cpu", "trainer.deterministic=true", "trainer.max_epochs=3", "seed=1,2"]
    releaser = threading.Thread(target=release_requeued, args=(cluster, done), daemon=True)
    releaser.start()
    # One CPU each, so that both jobs run at once (the submit-and-return test gives no resources: they come from
    # the run).
    # seed=1 is preempted mid-epoch: after its first step it asks SLURM to requeue it (scontrol requeue).
    # seed=2 meets its time limit: a minute, with submitit's signal 10 s before it. SLURM looks at time limits
    # every 30 s, so the signal comes 20 to 50 s after the job starts; until it is stopped, the job takes 2 s a step
    # (30 steps), so it is still training then. Resumed, each job goes at its own pace.
    slurm = ["hydra.launcher.cpus_per_task=1", "hydra.launcher.timeout_min=1", "hydra.launcher.signal_delay_s=10"]
    requeue = f"+callbacks.requeue={{_target_:probes.RequeueOnce,marker:'{marker}',step:1,job:'seed=1'}}"
    code, out, err = submit(
        forked_cli, cluster, tmp_path, synthetic_data_dir, *jobs, *slurm, pace(2, True), requeue, "sweep=array"
    )
    done.touch()
    assert code == 0 and marker.exists(), out[-3000:] + err[-2000:] + controller_log(cluster)
    output, sweep_dir = out + err, tmp_path / "outputs" / "sweeps" / "array"
    (array,) = re.findall(r"Submitted SLURM job (\d+) \(2 job\(s\); 1 CPUs, 4 GB, 0 GPUs", output)  # one array
    assert sorted(path.name for path in (sweep_dir / ".submitit").glob(f"{array}_*")) == [f"{array}_0", f"{array}_1"]
    assert "2 jobs: 2 completed." in (sweep_dir / "summary.md").read_text()
    for noise in ("sacct", "accounting storage", "srun", "Traceback"):  # no accounting, no Lightning hint
        assert noise not in output, noise
    preempted, timed_out = (
        "".join(path.read_text() for path in (sweep_dir / ".submitit" / f"{array}_{index}").glob("*_log.*"))
        for index in (0, 1)
    )
    assert (
        "stopped by SIGTERM" in preempted and "Resuming from" in preempted
    )  # the first attempt's end, the next's start
    assert "timed-out" not in preempted
    assert "Caught signal SIGUSR2" in timed_out and "this job is timed-out" in timed_out
    assert "stopped by SIGUSR2" in timed_out and "Resuming from" in timed_out
    # the same jobs on this machine, never interrupted: the same weights and optimizer states, bit for bit
    code, text = forked_cli.run(
        ["-m", *SYNTHETIC_RUN, f"paths.data_dir={synthetic_data_dir}", *jobs, "sweep=uninterrupted"], tmp_path
    )
    assert code == 0, text[-3000:]
    for seed in (1, 2):
        job, alone = (job_of(folder, seed) for folder in (sweep_dir, tmp_path / "outputs" / "sweeps" / "uninterrupted"))
        metrics = json.loads((job / "metrics.json").read_text())
        assert metrics["status"] == "completed" and metrics["epochs"] == 3 and metrics["step"] == 30
        ours, theirs = (torch.load(f / "checkpoints" / "last.ckpt", weights_only=True) for f in (job, alone))
        assert ours["state_dict"].keys() == theirs["state_dict"].keys()
        for key, value in theirs["state_dict"].items():
            assert torch.equal(ours["state_dict"][key], value), (seed, key)
        for index, values in theirs["optimizer_states"][0]["state"].items():
            for name, value in values.items():
                assert torch.equal(ours["optimizer_states"][0]["state"][index][name], value), (seed, index, name)


@pytest.mark.slow
def test_a_search_runs_its_trials_as_slurm_jobs_that_report_and_are_pruned(
    forked_cli, cluster, synthetic_data_dir, tmp_path
):
    code, out, err = submit(
        forked_cli,
        cluster,
        tmp_path,
        synthetic_data_dir,
        "trainer=cpu",
        "trainer.max_epochs=3",
        "hydra/sweeper=optuna",
        "hydra.sweeper.n_trials=2",
        "hydra.sweeper.n_jobs=2",  # both trials asked at once: one array of two SLURM jobs
        "hydra.launcher.cpus_per_task=1",
        "optimizer.lr=choice(0.003, 0.00001)",
        # a trial below 0.3 val/acc after its first epoch is pruned, from inside its SLURM job
        "~hydra.sweeper.pruner.n_startup_trials",
        "~hydra.sweeper.pruner.n_warmup_steps",
        "hydra.sweeper.pruner._target_=optuna.pruners.ThresholdPruner",
        "+hydra.sweeper.pruner.lower=0.3",
        "sweep=search",
    )
    assert code == 0, err[-3000:]
    assert (out + err).count("Submitted SLURM job") == 1
    trials = {
        trial.params["optimizer.lr"]: trial for trial in study_of(tmp_path / "outputs" / "sweeps" / "search").trials
    }
    assert trials[0.003].state.name == "COMPLETE" and sorted(trials[0.003].intermediate_values) == [1, 2, 3]
    assert trials[0.00001].state.name == "PRUNED" and sorted(trials[0.00001].intermediate_values) == [1]


@pytest.mark.slow
def test_a_stacked_sweep_runs_as_one_slurm_job(forked_cli, cluster, synthetic_data_dir, tmp_path):
    code, out, err = submit(
        forked_cli,
        cluster,
        tmp_path,
        synthetic_data_dir,
        "hydra/launcher=stacked_slurm",
        "trainer=cpu",
        "seed=1,2,3",
        "sweep=stacked",
    )
    assert code == 0, err[-3000:]
    sweep_dir = tmp_path / "outputs" / "sweeps" / "stacked"
    assert "Submitted SLURM job" in out + err and "(1 job(s);" in out + err  # one SLURM job for the three
    jobs = [json.loads(path.read_text()) for path in sorted(sweep_dir.glob("*/metrics.json"))]
    assert [(job["status"], job.get("stacked_jobs")) for job in jobs] == [("completed", 3)] * 3
    assert "3 jobs: 3 completed." in (sweep_dir / "summary.md").read_text()


@pytest.mark.slow
def test_submit_and_return_then_a_cancelled_job_is_interrupted_and_the_same_command_resumes_only_it(
    forked_cli, cluster, synthetic_data_dir, tmp_path
):
    # trainer=cpu and nothing about the cluster's resources: the request comes from the run (a node's 2 CPUs)
    args = ["trainer=cpu", "trainer.max_epochs=3", "seed=1,2", pace(0.15), "hydra.launcher.wait=false", "sweep=later"]
    sweep_dir = tmp_path / "outputs" / "sweeps" / "later"

    def report() -> str:
        code, text, _ = forked_cli.run_apart([str(sweep_dir)], tmp_path, "mlplab-report", cluster, 60, [])
        assert code == 0, text[-2000:]
        return text

    def drained() -> None:
        deadline = time.monotonic() + 180
        while queue(cluster) and time.monotonic() < deadline:
            time.sleep(0.5)

    code, out, err = submit(forked_cli, cluster, tmp_path, synthetic_data_dir, *args)
    assert code == 0, err[-3000:]
    assert re.search(r"Submitted SLURM job \d+ \(2 job\(s\); 2 CPUs, 4 GB, 0 GPUs per node each\)", out + err)
    assert f"Follow the sweep with: mlplab-report {Path('outputs/sweeps/later')}" in out + err
    assert len(queue(cluster).splitlines()) == 2  # returned while both jobs are still in the queue
    # the same command while they are queued or running submits nothing twice
    code, out, err = submit(forked_cli, cluster, tmp_path, synthetic_data_dir, *args)
    assert code == 0 and (out + err).count("already in the queue as SLURM job") == 2
    assert "Submitted SLURM job" not in out + err
    assert "(SLURM job" in report()  # queued or running, as the scheduler says
    # scancel the seed=2 job once it has a checkpoint to resume from
    deadline, victim = time.monotonic() + 120, None
    while victim is None and time.monotonic() < deadline:
        seed_2 = [p.parent.parent for p in sweep_dir.glob("*/.hydra/overrides.yaml") if "- seed=2\n" in p.read_text()]
        if seed_2 and (seed_2[0] / "checkpoints" / "last.ckpt").is_file():
            running = [line.split("|") for line in queue(cluster, "%i|%T").splitlines()]
            victim = next((job_id for job_id, state in running if job_id.endswith("_1") and state == "RUNNING"), None)
        time.sleep(0.2)
    assert victim, report()
    subprocess.run(["scancel", victim], env={**os.environ, **cluster}, check=True)
    drained()
    assert "2 jobs: 1 completed, 1 interrupted." in report()
    # the same command again: only the cancelled job is submitted, and it continues from its checkpoint
    code, out, err = submit(forked_cli, cluster, tmp_path, synthetic_data_dir, *args)
    assert code == 0 and "2 jobs, 1 done already, 1 to run" in out + err, err[-3000:]
    drained()
    assert "2 jobs: 2 completed." in report()
    assert json.loads((job_of(sweep_dir, 2) / "metrics.json").read_text())["epochs"] == 3
    logs = "".join(path.read_text() for path in (sweep_dir / ".submitit").rglob("*_log.*"))
    assert "sweep stopped by SIGTERM" in logs and "Resuming from" in logs  # the cancelled attempt, then the new


@pytest.mark.slow
def test_a_data_parallel_job_runs_as_two_slurm_tasks_and_tests_as_one_process_evaluates_its_best_checkpoint(
    forked_cli, cluster, synthetic_data_dir, tmp_path
):
    ddp = ["trainer=ddp", "trainer.devices=2", "trainer.accelerator=cpu", "trainer.max_epochs=2"]
    hard = ["optimizer.lr=3e-5", "data.batch_size=32"]  # not so easy that both opinions are 1.0
    code, out, err = submit(forked_cli, cluster, tmp_path, synthetic_data_dir, *ddp, *hard, "sweep=ddp")
    assert code == 0, err[-3000:]
    (array,) = re.findall(r"Submitted SLURM job (\d+) \(1 job\(s\); 2 CPUs, 8 GB, 0 GPUs", out + err)  # 2 tasks
    sweep_dir = tmp_path / "outputs" / "sweeps" / "ddp"
    (job,) = [path.parent for path in sweep_dir.glob("*/metrics.json")]
    recorded = json.loads((job / "metrics.json").read_text())
    assert recorded["status"] == "completed" and recorded["epochs"] == 2
    # Lightning took the ranks from SLURM: each task is one rank, and no task started a rank of its own
    logs = {task: (sweep_dir / ".submitit" / array / f"{array}_{task}_log.err").read_text() for task in (0, 1)}
    assert [re.findall(r"GLOBAL_RANK: (\d), MEMBER: (\d)/(\d)", logs[task]) for task in (0, 1)] == [
        [("0", "1", "2")],
        [("1", "2", "2")],
    ]
    assert sorted(path.name for path in job.glob("*.log")) == ["train.log"]  # rank 1 wrote no log file of its own
    assert "Traceback" not in out + err + logs[0] + logs[1] and "deprecated" not in logs[0] + logs[1]
    code, single, errors = forked_cli.run_apart(
        [f"run={job}", "format=json", "accelerator=cpu"],
        tmp_path,
        "mlplab-eval",
        {"MLPLAB_DATA_DIR": str(synthetic_data_dir)},
        120,
        [],
    )
    assert code == 0, errors[-2000:]
    single = json.loads(single)
    assert 0.2 < single["test/acc"] < 1.0
    assert recorded["test/acc"] == pytest.approx(single["test/acc"], abs=1e-6)
    assert recorded["test/loss"] == pytest.approx(single["test/loss"], rel=1e-4)


@pytest.mark.slow
def test_the_readmes_search_over_many_nodes_shares_one_postgresql_study(synthetic_data_dir, cluster, tmp_path):
    """README's sbatch line as it is, shrunk to this cluster: two search processes (one CPU each), small trials."""
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    (line,) = [line.strip() for line in readme.splitlines() if line.strip().startswith("sbatch --array=")]
    shrunk = {"--array": "--array=1-2", "--cpus-per-task": "--cpus-per-task=1", "--mem": "--mem=2G"}
    args = [shrunk.get(arg.split("=", 1)[0], arg) for arg in shlex.split(line)]
    small = [
        *SYNTHETIC_RUN,
        "callbacks.model_summary=null",
        "hydra.sweeper.n_trials=6",
        "model.width=choice(16, 24, 32)",
        "optimizer.lr=tag(log, interval(0.0003, 0.01))",
        "data.batch_size=10",
        "+callbacks.pace={_target_:probes.PaceSteps,seconds:0.01}",
    ]
    with postgres_server() as url:
        args[-1] = re.sub(r"postgresql\S+", url, args[-1]) + " " + " ".join(shlex.quote(arg) for arg in small)
        env = {**cli_env(synthetic_data_dir), **cluster, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
        submitted = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True)
        assert submitted.returncode == 0, submitted.stderr
        deadline = time.monotonic() + 240
        while queue(cluster) and time.monotonic() < deadline:
            time.sleep(0.5)
        logs = "".join(path.read_text() for path in tmp_path.glob("slurm-*.out"))
        assert "Traceback" not in logs and not queue(cluster), logs[-3000:]
        study = optuna.load_study(study_name="wide", storage=url)
        trials = study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
        every_trial, best = study.get_trials(), study.best_trial
    assert len(trials) == 6 and len({tuple(sorted(t.params.items())) for t in trials}) == 6  # none twice
    # nothing cut short or failed; the two array tasks start together, and a proposal both make at the same moment
    # is set aside by the later one (docs/sweeps-in-depth.md), asked again, and trains once
    others = [t for t in every_trial if t.state != optuna.trial.TrialState.COMPLETE]
    assert all(DUPLICATE_OF in t.user_attrs for t in others), [(t.state, t.user_attrs) for t in others]
    sweeps = {task: tmp_path / "outputs" / "sweeps" / f"wide-{task}" for task in (1, 2)}
    own = {}
    for task, sweep_dir in sweeps.items():  # each array task's own folder
        with (sweep_dir / "summary.csv").open() as file:
            own[task] = [row["job"] for row in csv.DictReader(file)]
    assert own[1] and own[2]  # both processes ran trials: each summary lists its own
    assert sorted(own[1] + own[2]) == sorted(t.user_attrs["job"] for t in trials)
    for sweep_dir in sweeps.values():  # and the study's best, wherever it ran
        summary = (sweep_dir / "summary.md").read_text()
        assert f"Best: trial {best.number}, {best.user_attrs['job']}" in summary
        assert "6 distinct trials (6 complete)" in summary and "mlplab@127.0.0.1" in summary
