"""A run's damaged records (metrics.json, provenance.json, .hydra/, checkpoints) and mistyped paths, as a user meets
them on the command line: one line that names the file or the key and the remedy, no traceback, the run folder
untouched; and the one-line notes a CPU run gives where it does otherwise than its settings say."""

import json
import logging
import os
import shutil
from pathlib import Path

import pytest
from conftest import SYNTHETIC_RUN, run_cli, single_run_dir

from mlplab.run.settings import TrainerSettings
from mlplab.run.trainer import build_trainer

REMEDY = "restore it from a copy, or remove it and run the command again"
CHECKPOINT_REMEDY = "restore it from a copy, or give another checkpoint of the run"


@pytest.fixture(scope="module")
def finished_run(synthetic_data_dir, tmp_path_factory) -> Path:
    """A run of one short epoch, completed: metrics.json, provenance.json, .hydra/ and both checkpoints."""
    cwd = tmp_path_factory.mktemp("finished")
    args = [*SYNTHETIC_RUN, "model.width=16", "trainer.limit_train_batches=2", "logger=none"]
    result = run_cli(["mlplab-train", *args], cwd, synthetic_data_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    return single_run_dir(cwd)


def copy_of(run: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(run, tmp_path / "outputs" / "runs" / run.name))


def cut_short(path: Path) -> None:
    """As a full disk or a killed copy leaves a file: its first half."""
    content = path.read_bytes()
    path.write_bytes(content[: len(content) // 2])


def files_of(folder: Path) -> dict[str, bytes]:
    return {str(path.relative_to(folder)): path.read_bytes() for path in folder.rglob("*") if path.is_file()}


def the_one_error_line(result, tool: str) -> str:
    """stderr, which must be one line: the error."""
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert result.stderr.startswith(f"{tool}: error: ")
    return result.stderr.rstrip("\n")


@pytest.mark.parametrize(
    "record, damage",
    [
        ("metrics.json", cut_short),
        (".hydra/config.yaml", lambda path: path.write_text("trainer: {limit_test_batches: [1,\n")),
    ],
)
@pytest.mark.slow
def test_eval_refuses_a_run_with_a_damaged_record_in_one_line(
    record, damage, finished_run, synthetic_data_dir, tmp_path
):
    run = copy_of(finished_run, tmp_path)
    damage(run / record)
    result = run_cli(["mlplab-eval", f"run={run}"], tmp_path, synthetic_data_dir)
    assert result.returncode == 2
    line = the_one_error_line(result, "mlplab-eval")
    assert f"{run / record} is damaged" in line and REMEDY in line
    assert result.stdout == ""  # no report from half a record


@pytest.mark.parametrize(
    "tool, args",
    [
        ("mlplab-eval", ["run={run}"]),
        ("mlplab-predict", ["run={run}", "inputs=test"]),
        ("mlplab-train", ["resume={run}", "trainer.max_epochs=2"]),
    ],
)
@pytest.mark.slow
def test_a_checkpoint_cut_short_is_one_complete_sentence_with_the_remedy(
    tool, args, finished_run, synthetic_data_dir, tmp_path
):
    run = copy_of(finished_run, tmp_path)
    for checkpoint in ("best.ckpt", "last.ckpt"):
        cut_short(run / "checkpoints" / checkpoint)
    result = run_cli([tool, *(arg.format(run=run) for arg in args)], tmp_path, synthetic_data_dir)
    assert result.returncode == 2
    line = the_one_error_line(result, tool)
    assert "is not a readable checkpoint (cut short or damaged: " in line
    assert line.endswith(f"); {CHECKPOINT_REMEDY}")  # torch's own words up to the end of a sentence, not cut off
    assert "If you are seeing this error" not in line  # the paragraph of advice that follows torch's first sentence


@pytest.mark.parametrize(
    "record, damage, remedy",
    [
        ("provenance.json", cut_short, REMEDY),
        (".hydra/overrides.yaml", lambda path: path.write_text("- model.width=16\n- [trainer=cpu\n"), "restore it"),
    ],
)
@pytest.mark.slow
def test_resume_refuses_a_damaged_record_and_leaves_the_run_as_it_was(
    record, damage, remedy, finished_run, synthetic_data_dir, tmp_path
):
    run = copy_of(finished_run, tmp_path)
    damage(run / record)
    before = files_of(run)
    result = run_cli(["mlplab-train", f"resume={run}", "trainer.max_epochs=2"], tmp_path, synthetic_data_dir)
    assert result.returncode == 2
    line = the_one_error_line(result, "mlplab-train")
    assert f"{run / record} is damaged" in line and remedy in line
    assert files_of(run) == before  # nothing trained, nothing written: not even a log line
    assert [path.name for path in (tmp_path / "outputs" / "runs").iterdir()] == [run.name]  # no new run either


@pytest.mark.slow
def test_resume_of_a_run_that_is_not_there_names_resume(synthetic_data_dir, tmp_path):
    result = run_cli(["mlplab-train", "resume=outputs/runs/nope"], tmp_path, synthetic_data_dir)
    assert result.returncode == 2
    line = the_one_error_line(result, "mlplab-train")
    assert line.startswith("mlplab-train: error: resume=outputs/runs/nope does not exist; ")


def test_report_on_a_folder_that_is_not_there_says_so(tmp_path):
    result = run_cli(["mlplab-report", "outputs/sweeps/nope"], tmp_path)
    assert result.returncode == 2
    line = the_one_error_line(result, "mlplab-report")
    assert line == (
        "mlplab-report: error: outputs/sweeps/nope does not exist; give a sweep folder made by mlplab-train -m"
    )


@pytest.mark.slow
def test_a_cpu_run_says_in_one_line_each_what_it_does_otherwise_than_asked(synthetic_data_dir, tmp_path):
    # 16-mixed, which Lightning runs as bf16-mixed on the CPU; a batch of 1000 from the 500 training images
    args = [*SYNTHETIC_RUN, "model.width=16", "trainer.precision=16-mixed", "data.batch_size=1000", "logger=none"]
    result = run_cli(["mlplab-train", *args], tmp_path, synthetic_data_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    output = result.stdout + result.stderr  # the run's log: on stdout, as Hydra logs by default
    notes = [
        "trainer.precision=16-mixed: Lightning has no float16 mixed precision on the CPU; training with bf16-mixed\n",
        "data.batch_size=1000 is larger than the training split (500 images): each epoch is one batch of them all, "
        "one optimizer step\n",
    ]
    assert [output.count(note) for note in notes] == [1, 1]
    assert "AMP with fp16 is not supported" not in output  # Lightning's own warning of it, among its other lines
    metrics = json.loads((single_run_dir(tmp_path) / "metrics.json").read_text())
    assert metrics["precision"] == "bf16-mixed" and metrics["step"] == 1


def test_data_parallel_ranks_beyond_the_cpu_cores_are_noted(tmp_path, caplog):
    # Built, not trained: the note comes with the trainer, before any rank starts.
    cores = len(os.sched_getaffinity(0))
    settings = TrainerSettings(accelerator="cpu", strategy="ddp", devices=cores + 1)
    with caplog.at_level(logging.INFO):
        build_trainer(settings, tmp_path, False, [], rank_command=["true"])
    assert [record.getMessage() for record in caplog.records if record.name.startswith("mlplab")] == [
        f"trainer.devices={cores + 1}: the {cores + 1} data-parallel ranks share this machine's {cores} CPU cores, "
        "which makes training slower than in one process"
    ]
