"""The sweep summary, from job folders written by hand (no training): its Pareto front, the configurations tied
with the best, and numbers and paths as a reader uses them."""

import csv
import json
from pathlib import Path

import numpy as np

from mlplab.run.records import write_val_correct
from mlplab.sweeps.pareto import pareto_front
from mlplab.sweeps.summary import sweep_dimensions, write_summary

# model.width -> (parameters, [(seed, best val/acc, seconds), ...])
JOBS = {
    16: (12730, [(1, 0.80, 10.0), (2, 0.82, 12.0)]),
    32: (25450, [(1, 0.85, 20.0), (2, 0.86, 22.0)]),
    64: (50890, [(1, 0.84, 9.0), (2, 0.85, 11.0)]),
    128: (101770, [(1, 0.87, 40.0), (2, 0.88, 44.0)]),
}


def write_sweep(sweep_dir: Path, jobs: dict, unfinished: bool = True) -> None:
    """A sweep folder as the sweeper leaves it: jobs.json, and each job's metrics.json."""
    listing = []
    for width, (parameters, seeds) in jobs.items():
        for seed, val_acc, seconds in seeds:
            overrides = [f"model.width={width}", f"seed={seed}"]
            write_job(
                sweep_dir, listing, overrides, "completed", val_acc, num_parameters=parameters, wall_seconds=seconds
            )
    if unfinished:  # more accurate and cheaper than any, but not completed: never on the front
        write_job(sweep_dir, listing, ["model.width=8", "seed=1"], "pruned", 0.95, num_parameters=6000)
        write_job(sweep_dir, listing, ["model.width=8", "seed=2"], "failed", 0.95, num_parameters=6000)
    (sweep_dir / "jobs.json").write_text(json.dumps(listing))


def write_job(sweep_dir: Path, listing: list, overrides: list[str], status: str, val_acc: float, **more) -> None:
    name = ",".join(overrides)
    (sweep_dir / name).mkdir(parents=True)
    metrics = {"status": status, "val/acc": val_acc, "test/acc": val_acc - 0.01, "epochs": 2, "best_epoch": 2}
    (sweep_dir / name / "metrics.json").write_text(json.dumps(metrics | more))
    listing.append({"overrides": overrides, "dir": name})


def section(text: str, title: str) -> str:
    return text.split(f"## {title}\n")[1].split("\n## ")[0].strip()


def test_pareto_front_keeps_the_points_no_other_beats_cheapest_first():
    assert pareto_front([(100, 0.80), (200, 0.85), (150, 0.79), (400, 0.85), (50, 0.70)]) == [4, 0, 1]
    assert pareto_front([]) == []
    assert pareto_front([(10, 0.5)]) == [0]
    # same cost: only the most accurate; same accuracy: only the cheapest
    assert pareto_front([(100, 0.80), (100, 0.82), (300, 0.82), (200, 0.82)]) == [1]
    # equal in both: neither beats the other, both are on the front (in input order)
    assert pareto_front([(200, 0.9), (100, 0.8), (200, 0.9), (300, 0.85)]) == [1, 0, 2]
    assert pareto_front([(300, 0.7), (200, 0.8), (100, 0.9)]) == [2]  # the cheapest is also the best


def test_summary_lists_the_front_against_parameters_and_seconds_over_seeds(tmp_path):
    write_sweep(tmp_path, JOBS)
    _, text = write_summary(tmp_path)
    assert section(text, "Pareto front") == (
        "No other configuration has a `val/acc` at least as high with at most as many parameters (or seconds) and "
        "is better in one (means over each one's seeds).\n"
        "Pictured in `pareto.png`.\n"
        "\n"
        "By parameters:\n"
        "\n"
        "| model.width | seeds | val/acc mean | parameters | job |\n"
        "| --- | --- | --- | --- | --- |\n"
        "| 16 | 2 | 0.8100 | 12730 | `model.width=16,seed=1`; `model.width=16,seed=2` |\n"
        "| 32 | 2 | 0.8550 | 25450 | `model.width=32,seed=1`; `model.width=32,seed=2` |\n"
        "| 128 | 2 | 0.8750 | 101770 | `model.width=128,seed=1`; `model.width=128,seed=2` |\n"
        "\n"
        "By seconds:\n"
        "\n"
        "| model.width | seeds | val/acc mean | seconds | job |\n"
        "| --- | --- | --- | --- | --- |\n"
        "| 64 | 2 | 0.8450 | 10.00 | `model.width=64,seed=1`; `model.width=64,seed=2` |\n"
        "| 32 | 2 | 0.8550 | 21.00 | `model.width=32,seed=1`; `model.width=32,seed=2` |\n"
        "| 128 | 2 | 0.8750 | 42.00 | `model.width=128,seed=1`; `model.width=128,seed=2` |"
    )
    assert text == (tmp_path / "summary.md").read_text()
    for picture in ("pareto.png", "summary.png"):
        assert (tmp_path / picture).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", picture


def test_summary_front_of_single_jobs_names_each_job(tmp_path):
    one_seed = {width: (parameters, seeds[:1]) for width, (parameters, seeds) in JOBS.items()}
    write_sweep(tmp_path, one_seed, unfinished=False)
    _, text = write_summary(tmp_path)
    front = section(text, "Pareto front").split("By parameters:")[1].split("By seconds:")[0].strip()
    assert front == (
        "| model.width | val/acc | parameters | job |\n"
        "| --- | --- | --- | --- |\n"
        "| 16 | 0.8000 | 12730 | `model.width=16,seed=1` |\n"
        "| 32 | 0.8500 | 25450 | `model.width=32,seed=1` |\n"
        "| 128 | 0.8700 | 101770 | `model.width=128,seed=1` |"
    )
    assert "(means over" not in text and (tmp_path / "pareto.png").is_file()


def test_sweep_dimensions_are_the_keys_given_as_sweeps(tmp_path):
    # as the sweeper saves it before the first job: a search's parameters, then the command line's overrides
    (tmp_path / "multirun.yaml").write_text("""\
hydra:
  sweeper:
    params:
      model.depth: choice(1, 2, 3)
      optimizer.lr: interval(0.0001, 0.01)
      data.batch_size: 128
    seeds_per_trial: 3
  overrides:
    task:
    - trainer.max_epochs=2
    - model.width=64,128
    - +trainer.gradient_clip_val=0.5,1.0
    - optimizer=adam,sgd
    - sweep=search
""")
    assert sweep_dimensions(tmp_path) == [
        "model.depth",
        "optimizer.lr",
        "model.width",
        "trainer.gradient_clip_val",
        "optimizer",
        "seed",  # each trial trains with 3 seeds
    ]
    assert sweep_dimensions(tmp_path / "not-a-sweep") == []


def write_correct(
    job_dir: Path, right: int, wrong_of_best: range = range(0), right_of_others: range = range(0)
) -> None:
    """A job's val_correct.npz over 100 validation images (labels 0..9 in turn): the first ``right`` correct, as the
    best job has them, but wrong on ``wrong_of_best`` and right on ``right_of_others`` (images the best got wrong)."""
    correct = np.arange(100) < right
    correct[list(wrong_of_best)] = False
    correct[list(right_of_others)] = True
    write_val_correct(job_dir, correct, np.arange(100) % 10)


def one_seed_sweep(sweep_dir: Path, with_records: bool = True) -> None:
    """Four widths on one seed, the best (width 128) right on images 0..89: width 16 wrong on 10 of those
    (b=10, c=0), width 32 on 3 of them and right on one more (b=3, c=1), width 64 wrong on one (b=1, c=0)."""
    listing = []
    cases = {128: (0.90, range(0), range(0)), 16: (0.80, range(10), range(0)), 32: (0.88, range(3), range(90, 91))}
    cases[64] = (0.89, range(1), range(0))
    for width, (val_acc, wrong, right) in cases.items():
        write_job(sweep_dir, listing, [f"model.width={width}"], "completed", val_acc, num_parameters=width * 800)
        if with_records:
            write_correct(sweep_dir / f"model.width={width}", 90, wrong, right)
    (sweep_dir / "jobs.json").write_text(json.dumps(listing))


def test_summary_marks_configurations_tied_with_the_best_by_mcnemars_test(tmp_path):
    one_seed_sweep(tmp_path)
    _, text = write_summary(tmp_path)
    lines = text.splitlines()
    assert lines[2:5] == [
        "4 jobs: 4 completed.",
        "Ranked by best validation accuracy (`val/acc`); test accuracy is shown, never used to choose.",
        "2 configurations are tied with the best (p >= 0.05, McNemar's exact test on the validation images only one "
        "of the two classified correctly; column `vs best`): this validation set does not tell them apart.",
    ]
    assert lines[6:12] == [
        "| rank | model.width | val/acc | val/loss | best epoch | test/acc | epochs | seconds | parameters | job | "
        "vs best |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        "| 1 (best) | 128 | 0.9000 |  | 2 | 0.8900 | 2 |  | 102400 | model.width=128 | best |",
        "| 2 | 64 | 0.8900 |  | 2 | 0.8800 | 2 |  | 51200 | model.width=64 | 1 tied |",
        "| 3 | 32 | 0.8800 |  | 2 | 0.8700 | 2 |  | 25600 | model.width=32 | 0.625 tied |",
        "| 4 | 16 | 0.8000 |  | 2 | 0.7900 | 2 |  | 12800 | model.width=16 | 0.001953 worse |",
    ]


def test_summary_of_jobs_without_correctness_records_leaves_vs_best_empty_and_says_why(tmp_path):
    one_seed_sweep(tmp_path, with_records=False)  # as jobs trained before mlplab recorded val_correct.npz
    (tmp_path / "model.width=32" / "val_correct.npz").write_bytes(b"PK\x03\x04 cut short")
    _, text = write_summary(tmp_path)
    lines = text.splitlines()
    assert lines[4:6] == [
        "`vs best` is empty for 3 of the 3 other configurations: their jobs have no readable record of which "
        "validation images they classified correctly (`val_correct.npz`: jobs trained before mlplab wrote it have "
        "none).",
        "",
    ]
    assert [line.rsplit("|", 2)[1] for line in lines[8:12]] == [" best ", "  ", "  ", "  "]
    assert "tied with the best" not in text


def test_summary_over_seeds_marks_ties_by_welchs_test(tmp_path):
    # p-values as scipy.stats.ttest_ind(equal_var=False) gives them: 0.2002 (32 against 128), 6.787e-05 (16)
    three_seeds = {
        16: (12730, [(1, 0.80, 10.0), (2, 0.81, 12.0), (3, 0.805, 11.0)]),
        32: (25450, [(1, 0.86, 20.0), (2, 0.875, 22.0), (3, 0.865, 21.0)]),
        128: (101770, [(1, 0.87, 40.0), (2, 0.88, 44.0), (3, 0.875, 42.0)]),
    }
    write_sweep(tmp_path, three_seeds, unfinished=False)
    _, text = write_summary(tmp_path)
    assert text.splitlines()[4] == (
        "1 configuration is tied with the best (p >= 0.05, Welch's t-test on the seeds' best `val/acc`; column "
        "`vs best`): this validation set does not tell them apart."
    )
    assert section(text, "Over seeds") == (
        "| model.width | seeds | val/acc mean | val/acc std | test/acc mean | test/acc std | vs best |\n"
        "| --- | --- | --- | --- | --- | --- | --- |\n"
        "| 128 | 3 | 0.8750 | 0.005000 | 0.8650 | 0.005000 | best |\n"
        "| 32 | 3 | 0.8667 | 0.007638 | 0.8567 | 0.007638 | 0.2002 tied |\n"
        "| 16 | 3 | 0.8050 | 0.005000 | 0.7950 | 0.005000 | 6.787e-05 worse |"
    )
    assert text.splitlines()[6].endswith("| parameters | job |")  # per configuration, not per job


def test_summary_tables_show_4_significant_digits_and_the_csv_every_digit(tmp_path):
    listing = []
    for lr, val_acc in (("0.040929726807568505", 0.9056), ("0.0001234567", 0.9026)):
        more = {"val/loss": 0.2741289570473108, "wall_seconds": 12345.678, "num_parameters": 101770}
        write_job(tmp_path, listing, [f"optimizer.lr={lr}", "seed=1"], "completed", val_acc, **more)
    (tmp_path / "jobs.json").write_text(json.dumps(listing))
    _, text = write_summary(tmp_path)
    assert text.splitlines()[8:10] == [
        "| 1 (best) | 0.04093 | 0.9056 | 0.2741 | 2 | 0.8956 | 2 | 12346 | 101770 | optimizer.lr=0.040929726807568505,"
        "seed=1 | best |",
        "| 2 | 0.0001235 | 0.9026 | 0.2741 | 2 | 0.8926 | 2 | 12346 | 101770 | optimizer.lr=0.0001234567,seed=1 |  |",
    ]
    assert "| 0.04093 | 0.9056 | 101770 | `optimizer.lr=0.040929726807568505,seed=1` |" in section(text, "Pareto front")
    with (tmp_path / "summary.csv").open() as file:
        rows = list(csv.DictReader(file))
    assert (rows[0]["optimizer.lr"], rows[0]["val/loss"]) == ("0.040929726807568505", "0.2741289570473108")
    assert rows[0]["wall_seconds"] == "12345.678"


def test_a_seed_only_sweep_has_no_pareto_front(tmp_path):
    write_sweep(tmp_path, {64: JOBS[64]}, unfinished=False)
    (tmp_path / "pareto.png").write_bytes(b"an earlier front")
    _, text = write_summary(tmp_path)
    assert "## Pareto front" not in text and "pareto.png" not in text
    assert not (tmp_path / "pareto.png").exists() and (tmp_path / "summary.png").is_file()


def test_a_stacked_jobs_seconds_are_its_share_of_the_stack(tmp_path):
    listing = []
    for width, val_acc in ((16, 0.80), (32, 0.85)):  # one stack of 4 jobs took 40 s
        more = {"wall_seconds": 40.0, "stacked_jobs": 4, "num_parameters": width * 800}
        write_job(tmp_path, listing, [f"model.width={width}"], "completed", val_acc, **more)
    write_job(tmp_path, listing, ["model.width=64"], "completed", 0.84, wall_seconds=9.0, num_parameters=51200)
    (tmp_path / "jobs.json").write_text(json.dumps(listing))
    _, text = write_summary(tmp_path)
    assert [line.split(" | ")[7] for line in text.splitlines()[8:11]] == [
        "10.00 (1/4 of a stack)",
        "9.000",
        "10.00 (1/4 of a stack)",
    ]
    assert (
        "A stacked job's seconds are its share of its stack's (the stack's wall time over the N jobs it trained "
        "together, marked 1/N), here and in the Pareto front, so that jobs trained alone and stacked compare alike."
    ) in text.splitlines()
    assert section(text, "Pareto front").split("By seconds:")[1].strip() == (
        "| model.width | val/acc | seconds | job |\n"
        "| --- | --- | --- | --- |\n"
        "| 64 | 0.8400 | 9.000 | `model.width=64` |\n"
        "| 32 | 0.8500 | 10.00 | `model.width=32` |"
    )


def test_summary_commands_name_job_folders_relative_to_where_it_ran(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    sweep_dir = tmp_path / "outputs" / "sweeps" / "s"
    write_sweep(sweep_dir, {16: JOBS[16]}, unfinished=False)
    _, text = write_summary(sweep_dir)
    assert section(text, "Evaluate a job") == (
        "```\n"
        "mlplab-eval run=outputs/sweeps/s/model.width=16,seed=2\n"
        "mlplab-eval run=outputs/sweeps/s/model.width=16,seed=1\n"
        "```"
    )
    assert str(tmp_path) not in text


def test_a_searchs_section_says_whether_its_chosen_trial_is_tied_with_others(tmp_path):
    import optuna

    from mlplab.sweeps.storage import STUDY_FILE

    one_seed_sweep(tmp_path)
    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(tmp_path / STUDY_FILE)))
    study = optuna.create_study(study_name=tmp_path.name, storage=storage, direction="maximize")
    space = {"model.width": optuna.distributions.CategoricalDistribution([16, 32, 64, 128])}
    for width, value in ((16, 0.80), (128, 0.90), (32, 0.88)):
        attrs = {"job": f"model.width={width}", "overrides": [f"model.width={width}"]}
        study.add_trial(
            optuna.trial.create_trial(params={"model.width": width}, distributions=space, value=value, user_attrs=attrs)
        )
    _, text = write_summary(tmp_path)
    assert section(text, "Search").splitlines()[4] == (
        "Best: trial 1, model.width=128, objective 0.9000. 2 configurations are tied with it (p >= 0.05, McNemar's "
        "exact test on the validation images only one of the two classified correctly): this validation set does not "
        "tell them apart, so the choice among them is open."
    )
