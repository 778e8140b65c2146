"""A sweep's records as a user meets them (issue 32): a sweep name that is a path, a job whose records are damaged,
and a named sweep run again with another fixed setting. Through mlplab-train -m and mlplab-report on synthetic
data."""

import csv
import shutil
from pathlib import Path

import pytest
from conftest import SYNTHETIC_RUN, run_cli

TINY = [*SYNTHETIC_RUN, "trainer.limit_train_batches=2", "model.width=8", "callbacks.model_summary=null", "seed=1,2"]
DAMAGED_JSON = '{"status": "compl'  # a metrics.json cut short mid-write
REMEDY = (
    "restore it from a copy, or remove it and run the command again (a sweep trains such a job again from the start)"
)
SETTINGS_LINE = (
    "Sweep twice holds jobs of 2 settings: optimizer.lr=0.001 (2 jobs), optimizer.lr=0.01 (2 jobs, this command); "
    "its summary ranks them together, the setting a column (another sweep= name keeps them apart)"
)


def summary_rows(sweep_dir: Path) -> list[dict[str, str]]:
    with (sweep_dir / "summary.csv").open() as file:
        return list(csv.DictReader(file))


def job_named(sweep_dir: Path, *parts: str, without: str = "\0") -> Path:
    """The one job folder whose name holds every one of ``parts`` (and not ``without``)."""
    (job,) = [path for path in sweep_dir.iterdir() if all(p in path.name for p in parts) and without not in path.name]
    return job


@pytest.fixture(scope="module")
def twice(synthetic_data_dir, tmp_path_factory) -> tuple[Path, str]:
    """The issue's sweep: first run without optimizer.lr, then again with optimizer.lr=0.01. Its folder, and the
    second command's output."""
    cwd = tmp_path_factory.mktemp("twice")
    first = run_cli(["mlplab-train", "-m", *TINY, "sweep=twice"], cwd, synthetic_data_dir)
    assert first.returncode == 0, first.stderr[-2000:]
    second = run_cli(["mlplab-train", "-m", *TINY, "optimizer.lr=0.01", "sweep=twice"], cwd, synthetic_data_dir)
    assert second.returncode == 0, second.stderr[-2000:]
    return cwd, second.stdout + second.stderr


@pytest.mark.parametrize("name", ["../../etc", "/tmp/x"])
def test_a_sweep_name_that_is_a_path_is_refused_in_one_line_and_nothing_is_written(name, synthetic_data_dir, tmp_path):
    result = run_cli(["mlplab-train", "-m", *TINY, f"sweep={name}"], tmp_path, synthetic_data_dir)
    assert result.returncode == 2
    assert result.stderr == (
        f"mlplab-train: error: sweep={name}: not a sweep name; a sweep's folder is outputs/sweeps/<name>, and a "
        "name is letters, digits, '.', '_' and '-' (no '/', not '..')\n"
    )
    assert list(tmp_path.iterdir()) == []  # no outputs/, no ./etc


@pytest.mark.slow
def test_a_sweep_run_again_with_another_fixed_setting_says_so_before_training_and_fills_every_value(
    twice, synthetic_data_dir
):
    cwd, output = twice
    lines = output.splitlines()
    warned = [index for index, line in enumerate(lines) if line.endswith(SETTINGS_LINE)]
    trained = [index for index, line in enumerate(lines) if "Run directory:" in line]
    assert len(warned) == 1 and trained and warned[0] < min(trained)  # before the first job starts
    assert any(
        line.endswith(
            "Sweep outputs/sweeps/twice: 2 jobs, 0 done already, 2 to run; its folder also holds 2 jobs of earlier "
            "commands"
        )
        for line in lines
    )
    sweep_dir = cwd / "outputs" / "sweeps" / "twice"
    rows = sorted((row["seed"], row["optimizer.lr"], row["status"]) for row in summary_rows(sweep_dir))
    assert rows == [
        ("1", "0.001", "completed"),
        ("1", "0.01", "completed"),
        ("2", "0.001", "completed"),
        ("2", "0.01", "completed"),
    ]
    summary = (sweep_dir / "summary.md").read_text().splitlines()
    assert summary[4] == (
        "Settings changed between the commands that ran this sweep: `optimizer.lr`. Jobs of every setting are ranked "
        "together, the setting a column; where a job's command line left a key out, its value is the one the job's "
        "own config recorded."
    )
    over_seeds = summary[summary.index("## Over seeds") + 4 :][:2]  # after its header and rule: one row a setting
    assert sorted(row.split(" | ")[:2] for row in over_seeds) == [["| 0.001", "2"], ["| 0.01", "2"]]
    # Extended with values of keys the folder now sweeps (seed, optimizer.lr): no setting changed, no line.
    extended = run_cli(
        ["mlplab-train", "-m", *TINY[:-1], "seed=3", "optimizer.lr=0.01", "sweep=twice", "dry_run=true"],
        cwd,
        synthetic_data_dir,
    )
    assert extended.returncode == 0 and "holds jobs of" not in extended.stdout + extended.stderr


def test_report_lists_a_job_with_a_damaged_record_as_unreadable_and_summarises_the_rest(twice, tmp_path):
    cwd, _ = twice
    shutil.copytree(cwd / "outputs", tmp_path / "outputs")
    sweep_dir = Path("outputs/sweeps/twice")
    metrics = job_named(tmp_path / sweep_dir, "seed=1", without="optimizer.lr") / "metrics.json"
    overrides = job_named(tmp_path / sweep_dir, "seed=2", without="optimizer.lr") / ".hydra" / "overrides.yaml"
    metrics.write_text(DAMAGED_JSON)
    overrides.write_text("- trainer=cpu\n- [trainer.max_epo\n")  # cut short mid-line

    result = run_cli(["mlplab-report", str(sweep_dir)], tmp_path)

    assert result.returncode == 0 and result.stderr == ""
    shown = {row["job"]: (row["status"], row["error"]) for row in summary_rows(tmp_path / sweep_dir)}
    assert shown == {
        job_named(tmp_path / sweep_dir, "optimizer.lr=0.01", "seed=1").name: ("completed", ""),
        job_named(tmp_path / sweep_dir, "optimizer.lr=0.01", "seed=2").name: ("completed", ""),
        metrics.parent.name: (
            "unreadable",
            f"{sweep_dir / metrics.parent.name}/metrics.json is damaged (not readable JSON: Unterminated string "
            f"starting at: line 1 column 12 (char 11)); {REMEDY}",
        ),
        overrides.parent.parent.name: (
            "unreadable",
            f"{sweep_dir / overrides.parent.parent.name}/.hydra/overrides.yaml is damaged (not readable YAML at line "
            f"3, column 1); {REMEDY}",
        ),
    }
    assert "2 completed, 2 unreadable." in result.stdout
    assert "## Unreadable" in result.stdout


@pytest.mark.slow
def test_a_sweep_run_again_starts_a_job_with_a_damaged_metrics_json_over_and_says_so(
    twice, synthetic_data_dir, tmp_path
):
    cwd, _ = twice
    shutil.copytree(cwd / "outputs", tmp_path / "outputs")
    job = job_named(tmp_path / "outputs" / "sweeps" / "twice", "optimizer.lr=0.01", "seed=1")
    (job / "metrics.json").write_text(DAMAGED_JSON)

    result = run_cli(["mlplab-train", "-m", *TINY, "optimizer.lr=0.01", "sweep=twice"], tmp_path, synthetic_data_dir)

    assert result.returncode == 0, result.stderr[-2000:]
    output = result.stdout + result.stderr
    said = [line for line in output.splitlines() if "is damaged" in line]
    assert len(said) == 1 and said[0].endswith(
        f"outputs/sweeps/twice/{job.name}/metrics.json is damaged; the job starts over, as a failed job does (the "
        "file kept as metrics.json.damaged)"
    )
    assert "2 jobs, 1 done already, 1 to run" in output
    assert "Resuming from" not in output  # started over: its checkpoints are not trusted without its record
    assert (job / "metrics.json.damaged").read_text() == DAMAGED_JSON
    rows = sorted((row["seed"], row["optimizer.lr"], row["status"]) for row in summary_rows(job.parent))
    assert rows == [
        ("1", "0.001", "completed"),
        ("1", "0.01", "completed"),
        ("2", "0.001", "completed"),
        ("2", "0.01", "completed"),
    ]
