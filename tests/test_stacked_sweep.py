"""Stacked sweeps (hydra/launcher=stacked) through the real command line: each job ends as the same job of a
job-by-job sweep ends (weights, records, TensorBoard tags, checkpoints that mlplab-eval and resume= take), jobs
that cannot stack run on their own with a line saying why, a diverging job leaves the stack, and a killed stack
resumes every job exactly."""

import json
import signal
from pathlib import Path

import pytest
import torch
from conftest import SYNTHETIC_RUN, run_cli
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from mlplab.model.classifier import ImageClassifier

SMALL = [*SYNTHETIC_RUN, "model.width=16", "trainer.max_epochs=2", "callbacks.model_summary=null"]


def sweep(forked_cli, tmp_path: Path, data_dir: Path, name: str, *overrides: str) -> tuple[int, str, Path]:
    code, output = forked_cli.run(
        ["-m", *SMALL, f"paths.data_dir={data_dir}", f"hydra.sweep.dir={name}", *overrides], tmp_path
    )
    return code, output, tmp_path / name


def jobs(sweep_dir: Path) -> dict[str, Path]:
    return {job.name: job for job in sorted(sweep_dir.iterdir()) if (job / "metrics.json").is_file()}


def scalars(job: Path) -> dict[str, list[tuple[int, float]]]:
    """Every tag of the job's event files with its (step, value) points; images and texts by their steps."""
    found: dict[str, list] = {}
    for path in sorted(job.glob("events.out.tfevents.*")):
        events = EventAccumulator(str(path), size_guidance={"images": 0, "scalars": 0, "tensors": 0})
        events.Reload()
        tags = events.Tags()
        for tag in tags["scalars"]:
            found.setdefault(tag, []).extend((event.step, round(event.value, 4)) for event in events.Scalars(tag))
        for tag in tags["images"]:
            found.setdefault(tag, []).extend((event.step, None) for event in events.Images(tag))
        for tag in tags["tensors"]:
            found.setdefault(tag, []).extend((event.step, None) for event in events.Tensors(tag))
    return {tag: sorted(points) for tag, points in found.items()}


@pytest.mark.slow
def test_each_stacked_job_ends_as_it_does_in_a_job_by_job_sweep(forked_cli, synthetic_data_dir, tmp_path):
    # per job: its seed's weights and batches, its own rate, and its own schedule of that rate
    grid = ["seed=1,2", "optimizer.lr=0.01,0.002", "scheduler=cosine"]
    code, output, stacked = sweep(forked_cli, tmp_path, synthetic_data_dir, "stacked", *grid, "hydra/launcher=stacked")
    assert code == 0, output[-3000:]
    assert "Training 4 jobs as one stack" in output
    code, output, alone = sweep(forked_cli, tmp_path, synthetic_data_dir, "alone", *grid)
    assert code == 0, output[-3000:]
    assert jobs(stacked).keys() == jobs(alone).keys() and len(jobs(alone)) == 4
    for name, job in jobs(stacked).items():
        other = alone / name
        mine, theirs = (json.loads((folder / "metrics.json").read_text()) for folder in (job, other))
        assert mine["status"] == theirs["status"] == "completed" and mine["stacked_jobs"] == 4
        for key in ("val/acc", "test/acc", "best_epoch", "epochs", "step"):
            assert mine[key] == pytest.approx(theirs[key], abs=1e-4), (name, key)
        assert sorted(path.name for path in (job / "checkpoints").iterdir()) == ["best.ckpt", "last.ckpt"]
        for checkpoint in ("best.ckpt", "last.ckpt"):
            a, b = (torch.load(folder / "checkpoints" / checkpoint, weights_only=True) for folder in (job, other))
            assert a.keys() == b.keys() and a["loops"] == b["loops"] and a["callbacks"].keys() == b["callbacks"].keys()
            assert a["hyper_parameters"] == b["hyper_parameters"] and a["lr_schedulers"] == b["lr_schedulers"]
            assert a["datamodule_hyper_parameters"]["shuffle_seed"] == b["datamodule_hyper_parameters"]["shuffle_seed"]
            for key, value in b["state_dict"].items():
                torch.testing.assert_close(a["state_dict"][key], value, rtol=1e-4, atol=1e-5)
            ours, single = a["optimizer_states"][0], b["optimizer_states"][0]
            assert ours["param_groups"] == single["param_groups"]
            for index, values in single["state"].items():
                for key, value in values.items():
                    torch.testing.assert_close(ours["state"][index][key], value, rtol=1e-4, atol=1e-5)
        # the same TensorBoard tags (curves, views, HParams) at the same steps, with the same values to rounding
        ours, single = scalars(job), scalars(other)
        assert ours.keys() == single.keys()
        for tag, points in single.items():
            if tag not in ("final/wall_seconds",):
                assert [step for step, _ in ours[tag]] == [step for step, _ in points], tag
                assert [value for _, value in ours[tag]] == pytest.approx([value for _, value in points], abs=2e-4), tag
    # A stacked job's checkpoints are an ordinary run's: mlplab-eval tests them, resume= trains on from them.
    job = next(iter(jobs(stacked).values()))
    result = run_cli(["mlplab-eval", f"run='{job}'", "format=json"], tmp_path, synthetic_data_dir)
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(result.stdout)
    assert report["test/acc"] == pytest.approx(report["recorded test/acc"], abs=1e-6)
    code, output = forked_cli.run(
        [f"resume='{job}'", "trainer.max_epochs=3", f"paths.data_dir={synthetic_data_dir}"], tmp_path
    )
    assert code == 0, output[-3000:]
    resumed = json.loads((job / "metrics.json").read_text())
    assert resumed["status"] == "completed" and resumed["epochs"] == 3 and resumed["step"] == 30


@pytest.mark.parametrize(
    "override, reason",
    [
        ("callbacks=ema", "weight averaging (EMAWeights): a stack does not keep each job's average"),
        ("callbacks=swa", "weight averaging (SWAWeights): a stack does not keep each job's average"),
    ],
)
@pytest.mark.slow
def test_regularised_jobs_run_on_their_own_saying_why(override, reason, forked_cli, synthetic_data_dir, tmp_path):
    code, output, swept = sweep(
        forked_cli, tmp_path, synthetic_data_dir, "own", "seed=1,2", override, "hydra/launcher=stacked"
    )
    assert code == 0, output[-3000:]
    assert output.count(f"runs on its own: {reason}") == 2, output[-3000:]
    for job in jobs(swept).values():
        assert json.loads((job / "metrics.json").read_text())["status"] == "completed"


@pytest.mark.slow
def test_jobs_that_cannot_stack_run_on_their_own_saying_why(forked_cli, synthetic_data_dir, tmp_path):
    code, output, swept = sweep(
        forked_cli,
        tmp_path,
        synthetic_data_dir,
        "mixed",
        "seed=1,2",
        "trainer.gradient_clip_val=null,1.0",
        "hydra/launcher=stacked",
    )
    assert code == 0, output[-3000:]
    # the two that clip gradients each say so; the two that do not stack
    assert output.count("runs on its own: trainer.gradient_clip_val=1.0 applies to each job on its own") == 2, output[
        -3000:
    ]
    assert "Training 2 jobs as one stack" in output
    assert all(json.loads((job / "metrics.json").read_text())["status"] == "completed" for job in jobs(swept).values())
    stacked = [name for name, job in jobs(swept).items() if "stacked_jobs" in (job / "metrics.json").read_text()]
    assert sorted(stacked) == sorted(name for name in jobs(swept) if "gradient_clip_val=null" in name)


@pytest.mark.slow
def test_a_diverging_job_leaves_the_stack_and_the_others_go_on(forked_cli, synthetic_data_dir, tmp_path):
    code, output, swept = sweep(
        forked_cli,
        tmp_path,
        synthetic_data_dir,
        "diverging",
        "optimizer.lr=0.001,1e30",
        "seed=1,2",
        "scheduler=plateau",
        "hydra/launcher=stacked",
    )
    assert code == 1, output[-3000:]  # the sweep did not complete every job, and says which
    assert "diverged and leaves the stack" in output and "2 of 4 jobs did not complete" in output
    for name, job in jobs(swept).items():
        metrics = json.loads((job / "metrics.json").read_text())
        if "1e+30" in name:
            assert metrics["status"] == "diverged" and "lower optimizer.lr" in metrics["error"]
            last = (
                torch.load(job / "checkpoints" / "last.ckpt", weights_only=True)
                if (job / "checkpoints" / "last.ckpt").is_file()
                else None
            )
            assert last is None or all(value.isfinite().all() for value in last["state_dict"].values())
        else:
            assert metrics["status"] == "completed" and metrics["epochs"] == 2


@pytest.mark.slow
def test_a_killed_stack_resumes_every_job_exactly(forked_cli, synthetic_data_dir, tmp_path):
    exact = [
        "seed=1,2",
        "model.width=8,16",  # two shapes in the stack
        "model.dropout=0.2",
        "trainer.deterministic=true",
        "trainer.max_epochs=3",
        "checkpoint.every_n_steps=3",
        "scheduler=warmup_cosine",
        "hydra/launcher=stacked",
    ]
    code, output, whole = sweep(forked_cli, tmp_path, synthetic_data_dir, "whole", *exact)
    assert code == 0, output[-3000:]
    assert "Training 4 jobs as one stack" in output
    code, output, killed = sweep(
        forked_cli,
        tmp_path,
        synthetic_data_dir,
        "killed",
        *exact,
        "+hydra.callbacks.kill._target_=probes.KillWhenStackCheckpoints",
    )
    assert code == -signal.SIGKILL, output[-3000:]
    assert not any('"completed"' in (job / "metrics.json").read_text() for job in jobs(killed).values())
    code, output, _ = sweep(forked_cli, tmp_path, synthetic_data_dir, "killed", *exact)
    assert code == 0, output[-3000:]
    assert "Resuming the stack from" in output
    for name, job in jobs(whole).items():
        a, b = (torch.load(folder / "checkpoints" / "last.ckpt", weights_only=True) for folder in (job, killed / name))
        for key, value in a["state_dict"].items():
            assert torch.equal(value, b["state_dict"][key]), (name, key)
        for index, values in a["optimizer_states"][0]["state"].items():
            assert all(
                torch.equal(value, b["optimizer_states"][0]["state"][index][key]) for key, value in values.items()
            )
        assert a["lr_schedulers"] == b["lr_schedulers"]
        histories = [json.loads((folder / "metrics.json").read_text())["history"] for folder in (job, killed / name)]
        assert histories[0] == histories[1]


@pytest.mark.slow
def test_max_stack_splits_a_group_and_is_checked(forked_cli, synthetic_data_dir, tmp_path):
    code, output, swept = sweep(
        forked_cli,
        tmp_path,
        synthetic_data_dir,
        "capped",
        "seed=1,2,3",
        "hydra/launcher=stacked",
        "hydra.launcher.max_stack=2",
    )
    assert code == 0, output[-3000:]
    assert "Training 2 jobs as one stack" in output and "runs on its own: no other job of the sweep stacks" in output
    sizes = sorted(
        json.loads((job / "metrics.json").read_text()).get("stacked_jobs", 1) for job in jobs(swept).values()
    )
    assert sizes == [1, 2, 2]
    code, output, _ = sweep(
        forked_cli,
        tmp_path,
        synthetic_data_dir,
        "refused",
        "seed=1,2",
        "hydra/launcher=stacked",
        "hydra.launcher.max_stack=0",
    )
    assert code == 2 and output.strip().splitlines()[-1] == (
        "mlplab-train: error: hydra.launcher.max_stack must be null (as many as memory holds) or an integer >= 1, got 0"
    )
    assert "Traceback" not in output


@pytest.mark.slow
def test_jobs_that_differ_in_dropout_and_the_schedules_numbers_stack_and_each_loads_alone(
    forked_cli, synthetic_data_dir, tmp_path
):
    # The README's stacked example mixes dropout 0 and 0.2: without Dropout layers an MLP's layers are numbered
    # otherwise. The schedule's numbers may differ within a stack too (mlplab.sweeps.stack_plan).
    grid = ["model.dropout=0,0.2", "optimizer.lr=0.01", "scheduler=cosine", "scheduler.eta_min=0,0.005"]
    code, output, swept = sweep(forked_cli, tmp_path, synthetic_data_dir, "mixed", *grid, "hydra/launcher=stacked")
    assert code == 0, output[-3000:]
    assert "Training 4 jobs as one stack" in output and "runs on its own" not in output
    assert len(list((swept / ".stacks").iterdir())) == 1
    assert len(jobs(swept)) == 4
    dropouts = set()
    for job in jobs(swept).values():
        metrics = json.loads((job / "metrics.json").read_text())
        assert metrics["status"] == "completed" and metrics["stacked_jobs"] == 4 and metrics["epochs"] == 2
        best = torch.load(job / "checkpoints" / "best.ckpt", weights_only=True)
        eta_min, dropout = (
            best["hyper_parameters"]["scheduler"]["eta_min"],
            best["hyper_parameters"]["backbone"]["dropout"],
        )
        dropouts.add(dropout)
        # its own schedule: cosine from 0.01 to its eta_min over 2 epochs, the second epoch halfway
        assert [lr for _, lr in scalars(job)["train/lr"]] == pytest.approx(
            {0: [0.01, 0.005], 0.005: [0.01, 0.0075]}[eta_min]
        )
        last = torch.load(job / "checkpoints" / "last.ckpt", weights_only=True)
        assert last["lr_schedulers"][0]["_last_lr"] == pytest.approx([eta_min])
        # its checkpoint loads into its own single network (with or without Dropout layers)
        model = ImageClassifier.from_checkpoint(best)
        assert any(isinstance(layer, torch.nn.Dropout) for layer in model.network) == (dropout > 0)
    assert dropouts == {0, 0.2}
    with_dropout = next(job for job in jobs(swept).values() if "model.dropout=0.2" in job.name)
    result = run_cli(["mlplab-eval", f"run='{with_dropout}'", "format=json"], tmp_path, synthetic_data_dir)
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(result.stdout)
    assert report["test/acc"] == pytest.approx(report["recorded test/acc"], abs=1e-6)


def test_a_stack_that_fails_runs_its_jobs_one_by_one(forked_cli, synthetic_data_dir, tmp_path):
    code, output, swept = sweep(
        forked_cli,
        tmp_path,
        synthetic_data_dir,
        "broken",
        "seed=1,2",
        "hydra/launcher=stacked",
        "+hydra.callbacks.break_stacks._target_=probes.BreakStacks",
    )
    assert code == 0, output[-3000:]
    assert "Stack of 2 jobs failed (RuntimeError: a stack's own bug); its jobs run one by one" in output
    assert len(jobs(swept)) == 2
    for job in jobs(swept).values():  # each trained on its own, from its start
        metrics = json.loads((job / "metrics.json").read_text())
        assert metrics["status"] == "completed" and metrics["epochs"] == 2, metrics
        assert "stacked_jobs" not in metrics and "error" not in metrics
    assert not list((swept / ".stacks").glob("*/checkpoints/*.ckpt"))  # nothing left to resume as a stack


def stacked_and_alone(forked_cli, tmp_path: Path, data_dir: Path, grid: list[str], count: int) -> Path:
    """The ``grid`` sweep as one stack of ``count`` jobs and job by job; checks that each stacked job ends as the
    same job alone (records, weights, schedules); returns the stacked sweep's folder."""
    code, output, stacked = sweep(forked_cli, tmp_path, data_dir, "stacked", *grid, "hydra/launcher=stacked")
    assert code == 0, output[-3000:]
    assert f"Training {count} jobs as one stack" in output and "runs on its own" not in output
    code, alone_output, alone = sweep(forked_cli, tmp_path, data_dir, "alone", *grid)
    assert code == 0, alone_output[-3000:]
    assert jobs(stacked).keys() == jobs(alone).keys() and len(jobs(alone)) == count
    for name, job in jobs(stacked).items():
        mine, theirs = (json.loads((folder / "metrics.json").read_text()) for folder in (job, alone / name))
        assert mine["status"] == theirs["status"] == "completed" and mine["stacked_jobs"] == count
        assert mine["num_parameters"] == theirs["num_parameters"]
        for key in ("val/acc", "test/acc", "best_epoch", "epochs", "step"):
            assert mine[key] == pytest.approx(theirs[key], abs=1e-4), (name, key)
        a, b = (torch.load(folder / "checkpoints" / "last.ckpt", weights_only=True) for folder in (job, alone / name))
        assert a["state_dict"].keys() == b["state_dict"].keys() and a["lr_schedulers"] == b["lr_schedulers"]
        for key, value in b["state_dict"].items():
            torch.testing.assert_close(a["state_dict"][key], value, rtol=1e-4, atol=1e-5)
    return stacked


@pytest.mark.slow
def test_jobs_of_several_depths_and_widths_train_as_one_stack_as_each_trains_alone(
    forked_cli, synthetic_data_dir, tmp_path
):
    grid = ["model.depth=1,2", "model.width=8,16,32", "model.dropout=0.0"]
    stacked = stacked_and_alone(forked_cli, tmp_path, synthetic_data_dir, grid, 6)
    # a job of another shape than the first's: its folder evaluates, predicts and resumes as an ordinary run's
    (job,) = [job for name, job in jobs(stacked).items() if name.startswith("model.depth=2,model.width=32,")]
    result = run_cli(["mlplab-eval", f"run='{job}'", "format=json"], tmp_path, synthetic_data_dir)
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads(result.stdout)["test/acc"] == pytest.approx(json.loads(result.stdout)["recorded test/acc"])
    result = run_cli(["mlplab-predict", f"run='{job}'", "inputs=test"], tmp_path, synthetic_data_dir)
    assert result.returncode == 0 and result.stdout.startswith("200 test predictions"), result.stderr[-2000:]
    assert len((job / "predictions_test.csv").read_text().splitlines()) == 201  # a header and one row per image
    code, output = forked_cli.run(
        [f"resume='{job}'", "trainer.max_epochs=3", f"paths.data_dir={synthetic_data_dir}"], tmp_path
    )
    assert code == 0, output[-3000:]
    assert json.loads((job / "metrics.json").read_text())["epochs"] == 3


@pytest.mark.slow
def test_jobs_of_other_norms_smoothing_and_schedules_stack_and_each_ends_as_it_does_alone(
    forked_cli, synthetic_data_dir, tmp_path
):
    # SGD: before batch norm a Linear's bias has no gradient but rounding, which Adam would turn into full steps.
    grid = ["model.norm=batch,layer", "label_smoothing=0.0,0.1", "scheduler=cosine,step", "optimizer=sgd"]
    grid += ["optimizer.lr=0.05"]
    stacked = stacked_and_alone(forked_cli, tmp_path, synthetic_data_dir, grid, 8)
    for name, job in jobs(stacked).items():
        a = torch.load(job / "checkpoints" / "last.ckpt", weights_only=True)
        if "model.norm=batch" in name:  # the running statistics of 2 epochs of 10 batches
            assert a["state_dict"]["network.2.num_batches_tracked"].item() == 20
            assert a["state_dict"]["network.2.running_var"].shape == (16,)
    (job,) = [
        job
        for name, job in jobs(stacked).items()
        if name.startswith("label_smoothing=0.1,model.norm=batch,scheduler=step")
    ]
    result = run_cli(["mlplab-eval", f"run='{job}'", "format=json"], tmp_path, synthetic_data_dir)
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads(result.stdout)["test/acc"] == pytest.approx(json.loads(result.stdout)["recorded test/acc"])
