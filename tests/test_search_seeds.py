"""Searches whose trials train several seeds (hydra.sweeper.seeds_per_trial), through the real command line on
synthetic data: a trial's objective is the mean of its seeds run as jobs of their own, job by job or as one stack,
and a pruned trial's networks leave their stack while the others finish. The study is read with Optuna itself."""

import json
from pathlib import Path

import pytest
from conftest import SYNTHETIC_RUN, run_cli, study_of

SEARCH = [
    "-m",
    "hydra/sweeper=optuna",
    *SYNTHETIC_RUN,
    "model.width=16",
    "callbacks.model_summary=null",
    "hydra.sweeper.seeds_per_trial=2",
]
# A pruner that needs no finished trial: a trial below 0.3 val/acc after its first epoch is pruned.
THRESHOLD = [
    "~hydra.sweeper.pruner.n_startup_trials",
    "~hydra.sweeper.pruner.n_warmup_steps",
    "hydra.sweeper.pruner._target_=optuna.pruners.ThresholdPruner",
    "+hydra.sweeper.pruner.lower=0.3",
]


def search(forked_cli, tmp_path: Path, data_dir: Path, name: str, *overrides: str) -> tuple[Path, str]:
    code, output = forked_cli.run([*SEARCH, f"paths.data_dir={data_dir}", f"sweep={name}", *overrides], tmp_path)
    assert code == 0, output[-3000:]
    assert "Traceback" not in output
    return tmp_path / "outputs" / "sweeps" / name, output


def metrics(job: Path) -> dict:
    return json.loads((job / "metrics.json").read_text())


@pytest.mark.slow
def test_a_trial_scores_the_mean_of_its_seeds_job_by_job_and_stacked(forked_cli, synthetic_data_dir, tmp_path):
    space = ["hydra.sweeper.n_trials=2", "hydra.sweeper.n_jobs=2", "trainer.max_epochs=2"]
    space.append("optimizer.lr=choice(0.001, 0.0003)")
    alone, _ = search(forked_cli, tmp_path, synthetic_data_dir, "alone", *space)
    stacked, output = search(forked_cli, tmp_path, synthetic_data_dir, "stacked", *space, "hydra/launcher=stacked")
    assert "Training 4 jobs as one stack" in output  # two trials of two seeds each, asked together
    by_rate = {}
    for sweep_dir in (alone, stacked):
        study = study_of(sweep_dir)
        assert sorted(t.state.name for t in study.trials) == ["COMPLETE", "COMPLETE"]
        for trial in study.trials:
            assert trial.user_attrs["seeds"] == [42, 43]  # the run's seed and the next: the same for every trial
            jobs = [sweep_dir / name for name in trial.user_attrs["jobs"]]
            assert ["seed=42" in jobs[0].name, "seed=43" in jobs[1].name] == [True, True]  # a folder per seed
            seeds = [metrics(job)["val/acc"] for job in jobs]
            assert trial.user_attrs["seed_values"] == seeds
            assert trial.value == pytest.approx((seeds[0] + seeds[1]) / 2, abs=1e-9)  # their mean, nothing else
            by_rate.setdefault(trial.params["optimizer.lr"], []).append((trial.value, seeds))
    for (value, seeds), (stacked_value, stacked_seeds) in by_rate.values():  # as the stacked sweep tests allow
        assert stacked_value == pytest.approx(value, abs=1e-4) and stacked_seeds == pytest.approx(seeds, abs=1e-4)
    # Each seed's folder is a run of its own: mlplab-eval tests its best checkpoint to the recorded accuracy.
    job = stacked / study_of(stacked).best_trial.user_attrs["jobs"][1]
    assert metrics(job)["stacked_jobs"] == 4
    result = run_cli(["mlplab-eval", f"run='{job}'", "format=json"], tmp_path, synthetic_data_dir)
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(result.stdout)
    assert report["test/acc"] == pytest.approx(report["recorded test/acc"], abs=1e-6)
    # The summary ranks the trials by their mean, with its spread, and says so for the best.
    summary = (stacked / "summary.md").read_text()
    assert "## Over seeds" in summary and "(mean ± std of 2 seeds" in summary


@pytest.mark.slow
def test_a_pruned_trial_leaves_the_stack_and_the_other_trial_finishes(forked_cli, synthetic_data_dir, tmp_path):
    args = ["hydra.sweeper.n_trials=2", "hydra.sweeper.n_jobs=2", "trainer.max_epochs=3", *THRESHOLD]
    sweep_dir, output = search(
        forked_cli,
        tmp_path,
        synthetic_data_dir,
        "pruned",
        *args,
        "optimizer.lr=choice(0.003, 0.00001)",
        "hydra/launcher=stacked",
    )
    assert "Training 4 jobs as one stack" in output and output.count("is pruned and leaves the stack") == 2
    trials = {t.params["optimizer.lr"]: t for t in study_of(sweep_dir).trials}
    assert trials[0.00001].state.name == "PRUNED" and trials[0.003].state.name == "COMPLETE"
    # the pruner judged the mean of both seeds' first epoch, each seed's curve kept
    slow = trials[0.00001]
    curves = [slow.user_attrs[f"mlplab.curve.seed={seed}"]["1"] for seed in (42, 43)]
    assert slow.intermediate_values == {1: pytest.approx((curves[0] + curves[1]) / 2)}
    for name in slow.user_attrs["jobs"]:
        recorded = metrics(sweep_dir / name)
        assert (
            recorded["status"] == "pruned" and recorded["epochs"] == 1 and "pruned after epoch 1" in recorded["pruned"]
        )
    for name in trials[0.003].user_attrs["jobs"]:
        recorded = metrics(sweep_dir / name)
        assert recorded["status"] == "completed" and recorded["epochs"] == 3 and "test/acc" in recorded


@pytest.mark.slow
def test_seeds_of_a_trial_one_after_another_stop_once_one_is_pruned(forked_cli, synthetic_data_dir, tmp_path):
    args = ["hydra.sweeper.n_trials=1", "trainer.max_epochs=3", *THRESHOLD, "optimizer.lr=choice(0.00001)"]
    sweep_dir, _ = search(forked_cli, tmp_path, synthetic_data_dir, "serial", *args)
    (trial,) = study_of(sweep_dir).trials
    first, second = (metrics(sweep_dir / name) for name in trial.user_attrs["jobs"])
    assert trial.state.name == "PRUNED" and first["status"] == second["status"] == "pruned"
    assert first["epochs"] == 1 and second["epochs"] == 0  # the second seed stops before it trains


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("hydra.sweeper.seeds_per_trial=0", "hydra.sweeper.seeds_per_trial=0: allowed: a whole number >= 1"),
        ("seed=choice(1, 2)", "seed is a search dimension and hydra.sweeper.seeds_per_trial=2 gives each trial"),
    ],
)
def test_bad_seed_settings_get_one_line(forked_cli, synthetic_data_dir, tmp_path, override, message):
    code, output = forked_cli.run(
        [
            *SEARCH,
            f"paths.data_dir={synthetic_data_dir}",
            "hydra.sweeper.n_trials=2",
            "model.width=choice(8, 16)",
            override,
        ],
        tmp_path,
    )
    assert code == 2 and message in output and "Traceback" not in output, output[-2000:]
    assert not list((tmp_path / "outputs" / "sweeps").glob("*/*/metrics.json"))  # nothing trained


@pytest.mark.slow
def test_the_first_job_of_a_stack_trains_on_when_every_other_is_pruned(forked_cli, synthetic_data_dir, tmp_path):
    # Four one-seed trials as one stack; the pruner (tests/probes.py) prunes trials 1 to 3 after epoch 2. The first
    # job (trial 0) was once taken for "no job left", and its stack stopped there with it "completed".
    prune = ["hydra.sweeper.pruner._target_=probes.PruneTrials", "+hydra.sweeper.pruner.numbers=[1,2,3]"]
    args = ["hydra.sweeper.n_trials=4", "hydra.sweeper.n_jobs=4", "hydra.sweeper.seeds_per_trial=1"]
    args += ["~hydra.sweeper.pruner.n_startup_trials", "~hydra.sweeper.pruner.n_warmup_steps", *prune]
    args += ["+hydra.sweeper.pruner.after=2", "trainer.max_epochs=4", "optimizer.lr=interval(0.001, 0.01)"]
    sweep_dir, output = search(forked_cli, tmp_path, synthetic_data_dir, "first", *args, "hydra/launcher=stacked")
    assert "Training 4 jobs as one stack" in output and output.count("is pruned and leaves the stack") == 3
    states = {trial.number: trial.state.name for trial in study_of(sweep_dir).trials}
    assert states == {0: "COMPLETE", 1: "PRUNED", 2: "PRUNED", 3: "PRUNED"}
    jobs = [job for job in sweep_dir.iterdir() if job.joinpath(".hydra/overrides.yaml").is_file()]
    (first,) = [job for job in jobs if "- trial=0" in job.joinpath(".hydra/overrides.yaml").read_text()]
    recorded = metrics(first)
    assert recorded["status"] == "completed" and recorded["epochs"] == 4 and recorded["step"] == 40
