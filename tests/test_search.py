"""Optuna searches as a user runs them (mlplab-train -m hydra/sweeper=optuna), in subprocesses on synthetic data; the
study is read back with Optuna itself."""

import csv
import json
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
from conftest import SYNTHETIC_RUN, run_cli, study_of
from omegaconf import OmegaConf

from mlplab.sweeps.storage import STUDY_FILE

BIN = Path(sys.executable).parent
SEARCH = [
    "-m",
    "hydra/sweeper=optuna",
    "hydra.sweeper.n_trials=6",
    *SYNTHETIC_RUN,
    "callbacks.model_summary=null",
    "sweep=search",
]
TWO_PARAMETERS = ["model.width=choice(16,32)", "optimizer.lr=tag(log, interval(0.0003, 0.01))"]


def states(study: optuna.Study) -> dict[str, int]:
    counts: dict[str, int] = {}
    for trial in study.get_trials():
        counts[trial.state.name] = counts.get(trial.state.name, 0) + 1
    return counts


def job_values(job_dir: Path) -> dict[str, str]:
    overrides = OmegaConf.load(job_dir / ".hydra" / "overrides.yaml")
    return dict(str(override).partition("=")[::2] for override in overrides)


def search(args: list[str], cwd: Path, data_dir: Path) -> subprocess.CompletedProcess:
    result = run_cli(["mlplab-train", *SEARCH, *args], cwd, data_dir)
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    return result


@pytest.mark.slow
def test_a_search_runs_its_trials_and_the_summary_matches_the_jobs(synthetic_data_dir, tmp_path):
    result = search(TWO_PARAMETERS, tmp_path, synthetic_data_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    sweep_dir = tmp_path / "outputs" / "sweeps" / "search"
    study = study_of(sweep_dir)
    assert states(study) == {"COMPLETE": 6}
    for trial in study.get_trials():  # each trial's sampled values are what its job trained with
        values = job_values(sweep_dir / trial.user_attrs["job"])
        assert int(values["model.width"]) == trial.params["model.width"]
        assert float(values["optimizer.lr"]) == trial.params["optimizer.lr"]
    with (sweep_dir / "summary.csv").open() as file:
        rows = list(csv.DictReader(file))
    assert len(rows) == 6 and {row["job"] for row in rows} == {t.user_attrs["job"] for t in study.get_trials()}
    summary = (sweep_dir / "summary.md").read_text()
    best = study.best_trial
    assert f"Best: trial {best.number}" in summary and (sweep_dir / "search.png").is_file()
    command = next(line for line in summary.splitlines() if line.startswith("mlplab-train "))
    assert command.startswith("mlplab-train ") and f"optimizer.lr={best.params['optimizer.lr']!r}" in command
    assert "sweep=" not in command and "trial=" not in command


@pytest.mark.slow
def test_diverging_trials_fail_and_the_search_goes_on_to_a_sane_best(synthetic_data_dir, tmp_path):
    result = search(
        [
            "optimizer.lr=choice(0.003, 1e30)",
            "seed=choice(1, 2, 3)",
            "hydra.sweeper.max_failure_ratio=0.9",
            "hydra.sweeper.sampler.seed=0",
        ],
        tmp_path,
        synthetic_data_dir,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    study = study_of(sweep_dir := tmp_path / "outputs" / "sweeps" / "search")
    failed = [t for t in study.get_trials() if t.state.name == "FAIL"]
    assert failed and all("DivergedError" in t.user_attrs["error"] for t in failed)
    assert study.best_trial.params["optimizer.lr"] == 0.003 and len(study.get_trials()) == 6
    assert "## Failed" in (sweep_dir / "summary.md").read_text()


@pytest.mark.slow
def test_a_hopeless_search_stops_with_a_clear_message(synthetic_data_dir, tmp_path):
    result = search(["optimizer.lr=interval(1e30, 2e30)"], tmp_path, synthetic_data_dir)
    assert result.returncode == 1
    (line,) = [line for line in result.stderr.splitlines() if line.startswith("mlplab-train: search stopped")]
    assert "4 of 6 trials failed" in line and "max_failure_ratio=0.5" in line and "diverged" in line.lower()


@pytest.mark.slow
def test_clearly_worse_trials_are_pruned_early(synthetic_data_dir, tmp_path):
    result = search(
        [
            "optimizer.lr=choice(0.00001, 0.003)",
            "seed=choice(1, 2, 3, 4)",
            "trainer.max_epochs=4",
            "hydra.sweeper.n_trials=8",
            "hydra.sweeper.sampler._target_=optuna.samplers.RandomSampler",
            "hydra.sweeper.sampler.seed=1",
            "hydra.sweeper.pruner.n_startup_trials=2",
            "hydra.sweeper.pruner.n_warmup_steps=2",
        ],
        tmp_path,
        synthetic_data_dir,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    sweep_dir = tmp_path / "outputs" / "sweeps" / "search"
    study = study_of(sweep_dir)
    pruned = [t for t in study.get_trials() if t.state.name == "PRUNED"]
    assert pruned and all(t.params["optimizer.lr"] == 0.00001 for t in pruned)
    summary = (sweep_dir / "summary.md").read_text()
    for trial in pruned:  # stopped early, and shown so
        metrics = (sweep_dir / trial.user_attrs["job"] / "metrics.json").read_text()
        recorded = json.loads(metrics)
        # the first epoch it could be pruned in (n_warmup_steps=2), counted from 1, and recorded with that epoch
        assert recorded["status"] == "pruned" and sorted(trial.intermediate_values) == [1, 2]
        assert [row["epoch"] for row in recorded["history"]] == [1, 2] and recorded["epochs"] == 2
        assert f"`{trial.user_attrs['job']}`: stopped after" in summary


@pytest.mark.slow
def test_two_parallel_workers_share_the_study_without_duplicates(synthetic_data_dir, tmp_path):
    result = search([*TWO_PARAMETERS, "hydra/launcher=parallel"], tmp_path, synthetic_data_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    sweep_dir = tmp_path / "outputs" / "sweeps" / "search"
    trials = study_of(sweep_dir).get_trials()
    assert len(trials) == 6 and all(t.state.name == "COMPLETE" for t in trials)
    assert len({t.number for t in trials}) == 6 and len({t.user_attrs["job"] for t in trials}) == 6
    assert all(list(t.intermediate_values) == [1] for t in trials)  # reported from the workers, for pruning
    assert len([p for p in sweep_dir.iterdir() if (p / "metrics.json").is_file()]) == 6


def test_a_sampled_config_that_is_invalid_is_a_failed_trial_and_the_search_goes_on(synthetic_data_dir, tmp_path):
    # dropout must be below 1: about half the space is invalid
    result = search(
        [
            "model.dropout=interval(0.5, 1.5)",
            "hydra.sweeper.n_trials=4",
            "hydra.sweeper.max_failure_ratio=1",
            "hydra.sweeper.sampler._target_=optuna.samplers.RandomSampler",
            "hydra.sweeper.sampler.seed=3",
        ],
        tmp_path,
        synthetic_data_dir,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    sweep_dir = tmp_path / "outputs" / "sweeps" / "search"
    trials = study_of(sweep_dir).get_trials()
    failed = [t for t in trials if t.state.name == "FAIL"]
    assert failed and all(t.params["model.dropout"] >= 1 for t in failed)
    assert all("model.dropout must satisfy 0 <= p < 1" in t.user_attrs["error"] for t in failed)
    assert all("job" not in t.user_attrs for t in failed)  # refused before training: no job folder
    assert all(t.state.name == "COMPLETE" and t.params["model.dropout"] < 1 for t in trials if t not in failed)


@pytest.mark.slow
def test_a_failing_trial_is_told_failed_with_its_error_and_the_search_goes_on(synthetic_data_dir, tmp_path):
    result = search(
        [
            "+callbacks.boom._target_=probes.RaiseAtStart",
            "+callbacks.boom.fail=choice(true, false)",
            "seed=choice(1, 2)",
            "hydra.sweeper.n_trials=4",
            "hydra.sweeper.max_failure_ratio=1",
            "hydra.sweeper.sampler._target_=optuna.samplers.RandomSampler",
            "hydra.sweeper.sampler.seed=0",
        ],
        tmp_path,
        synthetic_data_dir,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    sweep_dir = tmp_path / "outputs" / "sweeps" / "search"
    trials = study_of(sweep_dir).get_trials()
    assert len(trials) == 4 and {t.params["+callbacks.boom.fail"] for t in trials} == {True, False}
    for trial in trials:
        job = json.loads((sweep_dir / trial.user_attrs["job"] / "metrics.json").read_text())
        if trial.params["+callbacks.boom.fail"]:
            assert trial.state.name == "FAIL" and "this trial's own bug" in trial.user_attrs["error"]
            assert job["status"] == "failed"  # its own error: started over if the search is run again
        else:
            assert trial.state.name == "COMPLETE" and job["status"] == "completed"
    assert "## Failed" in (sweep_dir / "summary.md").read_text()


@pytest.mark.slow
def test_a_search_without_dimensions_or_with_a_sweep_it_cannot_sample_is_refused(synthetic_data_dir, tmp_path):
    result = search(["model.width=16"], tmp_path, synthetic_data_dir)
    assert result.returncode == 2 and "no dimensions" in result.stderr
    result = search(["model.activation=glob(*)"], tmp_path, synthetic_data_dir)
    (line,) = [line for line in result.stderr.splitlines() if line.startswith("mlplab-train: error:")]
    assert result.returncode == 2 and "model.activation" in line and "not a search dimension" in line


@pytest.mark.slow
def test_the_preset_runs_as_a_search_whose_trials_report_each_epoch(synthetic_data_dir, tmp_path):
    args = [
        "hparams_search=fmnist_mlp",
        "sweep=preset",
        "hydra.sweeper.n_trials=2",
        "trainer.max_epochs=2",
        "data.val_size=100",
        "data.system_dir=null",
        "data.download=false",
    ]  # no -m: the preset sets the mode
    result = run_cli(["mlplab-train", *args], tmp_path, synthetic_data_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    sweep_dir = tmp_path / "outputs" / "sweeps" / "preset"
    trials = study_of(sweep_dir).get_trials()
    assert len(trials) == 2 and all(sorted(t.intermediate_values) == [1, 2] for t in trials)
    assert all((sweep_dir / t.user_attrs["job"] / ".lock").is_file() for t in trials)  # claimed as sweep jobs
    for trial in trials:  # each job prunes with the preset's pruner, not the default one
        job_hydra = OmegaConf.load(sweep_dir / trial.user_attrs["job"] / ".hydra" / "hydra.yaml").hydra
        assert job_hydra.sweeper.pruner.n_warmup_steps == 6 and job_hydra.mode == "MULTIRUN"
        assert "hparams_search" not in trial.user_attrs["job"]


@pytest.mark.slow
def test_a_search_out_of_time_stops_asking_and_continues_when_run_again(synthetic_data_dir, tmp_path):
    result = search([*TWO_PARAMETERS, "hydra.sweeper.timeout=0.001"], tmp_path, synthetic_data_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    sweep_dir = tmp_path / "outputs" / "sweeps" / "search"
    if not (sweep_dir / STUDY_FILE).is_file():
        pytest.fail(result.stdout[-2000:])
    assert len(study_of(sweep_dir).get_trials()) <= 1  # at most the trial asked before time was up
    assert "Time is up" in result.stdout
    result = search(TWO_PARAMETERS, tmp_path, synthetic_data_dir)
    assert result.returncode == 0 and states(study_of(sweep_dir)) == {"COMPLETE": 6}
