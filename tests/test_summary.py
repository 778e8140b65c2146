"""The sweep summary's Pareto front, from job folders written by hand (no training)."""

import json
from pathlib import Path

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
        "| 64 | 2 | 0.8450 | 10.0 | `model.width=64,seed=1`; `model.width=64,seed=2` |\n"
        "| 32 | 2 | 0.8550 | 21.0 | `model.width=32,seed=1`; `model.width=32,seed=2` |\n"
        "| 128 | 2 | 0.8750 | 42.0 | `model.width=128,seed=1`; `model.width=128,seed=2` |"
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
