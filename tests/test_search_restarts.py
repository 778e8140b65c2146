"""A search killed at several points (during a trial, between trials, while its summary is written) and run again
until done: exactly n_trials distinct configurations, each trained once, for the TPE (random, in its start) and grid
samplers."""

import csv
import hashlib
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from conftest import SYNTHETIC_RUN, cli_env, study_of

from mlplab.sweeps.study import DUPLICATE_OF

BIN = Path(sys.executable).parent
# six configurations, four trials: a sampler that repeats itself would show it
SPACE = ["model.width=choice(16, 24, 32)", "optimizer.lr=choice(0.001, 0.003)"]
SLOW = ["data.batch_size=10", "checkpoint.every_n_steps=10", "+callbacks.pace={_target_:probes.PaceSteps,seconds:0.01}"]
# TPE's first 10 trials are its random start (Optuna's default n_startup_trials), so with four trials the TPE case is
# also the random sampler's; grid hands out its cells in order, another path through the no-repeat wrapper.
SAMPLERS = {
    "tpe": ["hydra.sweeper.sampler._target_=optuna.samplers.TPESampler"],
    "grid": ["hydra.sweeper.sampler._target_=optuna.samplers.GridSampler"],
}


def command(sampler: str) -> list[str]:
    return [
        "mlplab-train",
        "-m",
        "hydra/sweeper=optuna",
        "hydra.sweeper.n_trials=4",
        *SAMPLERS[sampler],
        *SYNTHETIC_RUN,
        "callbacks.model_summary=null",
        "sweep=restarts",
        *SPACE,
        *SLOW,
    ]


def finished_jobs(sweep_dir: Path) -> dict[str, str]:
    """Each completed job's checkpoint, as a digest: a job trained again would change it."""
    return {
        job.name: hashlib.sha1((job / "checkpoints" / "last.ckpt").read_bytes()).hexdigest()
        for job in sweep_dir.iterdir()
        if '"status": "completed"' in _text(job / "metrics.json")
    }


def _text(path: Path) -> str:
    return path.read_text() if path.is_file() else ""


@pytest.mark.parametrize("sampler", list(SAMPLERS))
def test_a_search_killed_three_times_runs_each_configuration_once(sampler, forked_cli, synthetic_data_dir, tmp_path):
    sweep_dir = tmp_path / "outputs" / "sweeps" / "restarts"
    args = [*command(sampler), f"paths.data_dir={synthetic_data_dir}"]
    # mlplab-train's main() in processes forked from one that imported it (conftest.ForkedCli), killed by Hydra
    # callbacks of the test's (tests/probes.py); the third run is a process of its own, killed from outside.
    # 1: killed during its second trial, once that trial has a checkpoint
    code, output = forked_cli.run(
        [*args[1:], "+hydra.callbacks.kill._target_=probes.KillDuringJob", "+hydra.callbacks.kill.job=2"], tmp_path
    )
    assert code == -signal.SIGKILL, output[-3000:]
    done = finished_jobs(sweep_dir)
    assert len(done) == 1
    # 2: the cut-short trial resumes; killed as the next new trial's job returns, before the study hears of it
    code, output = forked_cli.run(
        [*args[1:], "+hydra.callbacks.kill._target_=probes.KillAfterJobs", "+hydra.callbacks.kill.jobs=2"], tmp_path
    )
    assert code == -signal.SIGKILL, output[-3000:]
    done_later = finished_jobs(sweep_dir)
    assert len(done_later) == 3 and done.items() <= done_later.items()
    # 3: the last trial trains, then the process dies while it writes the summary
    process = subprocess.Popen(
        [str(BIN / args[0]), *args[1:]],
        cwd=tmp_path,
        env=cli_env(synthetic_data_dir),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 240
    while process.poll() is None and not (sweep_dir / "search.png").exists() and time.monotonic() < deadline:
        time.sleep(0.005)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=60)
    # 4: nothing left to train: the summary is written
    code, output = forked_cli.run(args[1:], tmp_path)
    assert code == 0 and "Traceback" not in output, output[-3000:]

    study = study_of(sweep_dir)
    complete = study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
    configurations = {(t.params["model.width"], t.params["optimizer.lr"]) for t in complete}
    assert len(complete) == 4 and len(configurations) == 4
    # the only other trials: the two cut short, each asked again; none failed, none proposed an existing configuration
    assert all(t.state.name in ("COMPLETE", "FAIL") and "error" not in t.user_attrs for t in study.get_trials())
    assert len(study.get_trials()) == 6 and not any(DUPLICATE_OF in t.user_attrs for t in study.get_trials())
    if sampler == "grid":  # the cells in order
        assert configurations == {(16, 0.001), (16, 0.003), (24, 0.001), (24, 0.003)}
    final = finished_jobs(sweep_dir)
    assert len(final) == 4 and done_later.items() <= final.items()  # no finished job trained again
    assert {t.user_attrs["job"] for t in complete} == set(final)
    with (sweep_dir / "summary.csv").open() as file:
        assert sorted(row["job"] for row in csv.DictReader(file)) == sorted(final)
    summary = (sweep_dir / "summary.md").read_text()
    assert "4 distinct trials (4 complete)" in summary and "Cut short and asked again: trial 1" in summary
