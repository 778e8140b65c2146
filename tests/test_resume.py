"""Interrupted runs resume exactly: real mlplab-train subprocesses stopped by signals, then `resume=`."""

import json
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import SYNTHETIC_RUN, run_cli, single_run_dir, start_train
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

BIN = Path(sys.executable).parent
# 250 steps per epoch (500 training images, batch 2), a checkpoint every 100 steps, deterministic kernels.
RUN = [
    *SYNTHETIC_RUN,
    "data.batch_size=2",
    "trainer.max_epochs=3",
    "trainer.deterministic=true",
    "checkpoint.every_n_steps=100",
    "model.width=32",
    "model.dropout=0.2",
]
STEPS_PER_EPOCH = 250
# Runs stopped from outside take ~10 s, not ~1 s: the signal lands mid-epoch as meant, however busy the machine.
PACED_RUN = [*RUN, "+callbacks.pace={_target_:probes.PaceSteps,seconds:0.01}"]


def start(args: list[str], cwd: Path, data_dir: Path) -> subprocess.Popen:
    return start_train(args, cwd, data_dir)


def saved_step(checkpoint: Path) -> int:
    try:
        return torch.load(checkpoint, map_location="cpu", weights_only=True)["global_step"]
    except (OSError, RuntimeError, EOFError, KeyError):
        return -1


def wait_for_file(path: Path, process: subprocess.Popen, seconds: float = 120) -> None:
    """Block until ``path`` exists (what the run does next is then certain), at most ``seconds``."""
    deadline = time.monotonic() + seconds
    while not path.exists():
        assert process.poll() is None, f"the run ended before {path.name}: {process.communicate()[1][-2000:]}"
        assert time.monotonic() < deadline, f"no {path.name} within {seconds} s"
        time.sleep(0.05)


def wait_for_step(cwd: Path, step: int, process: subprocess.Popen) -> Path:
    """Block until the run's last.ckpt was saved at ``step`` or later (mid-epoch 2 for steps above 250)."""
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and process.poll() is None:
        runs = list((cwd / "outputs" / "runs").glob("*/checkpoints/last.ckpt"))
        if runs and saved_step(runs[0]) >= step:
            return runs[0].parent.parent
        time.sleep(0.05)
    raise AssertionError(f"the run never reached step {step}: {process.communicate()[1][-2000:]}")


def final_state(run_dir: Path) -> tuple[dict, dict]:
    checkpoint = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    return checkpoint["state_dict"], metrics


def assert_same_run(resumed: Path, reference: Path) -> None:
    weights, metrics = final_state(resumed)
    reference_weights, reference_metrics = final_state(reference)
    assert weights.keys() == reference_weights.keys()
    for name, tensor in weights.items():
        assert torch.equal(tensor, reference_weights[name]), f"{name} differs"  # bit for bit
    assert metrics["status"] == "completed" and metrics["step"] == 3 * STEPS_PER_EPOCH
    for key in ("val/acc", "val/loss", "test/acc", "test/loss", "best_epoch", "epochs"):
        assert metrics[key] == reference_metrics[key], key
    assert [row["val/loss"] for row in metrics["history"]] == [row["val/loss"] for row in reference_metrics["history"]]
    events = EventAccumulator(str(resumed))
    events.Reload()
    reference_events = EventAccumulator(str(reference))
    reference_events.Reload()
    for tag in ("train/loss", "train/acc", "val/acc", "val/loss"):  # curves continue: no doubled or rewound steps
        points, reference_points = events.Scalars(tag), reference_events.Scalars(tag)
        assert [p.step for p in points] == [p.step for p in reference_points], tag
        assert [p.value for p in points] == pytest.approx([p.value for p in reference_points], rel=1e-6), tag


@pytest.fixture(scope="module")
def uninterrupted(synthetic_data_dir, tmp_path_factory) -> Path:
    cwd = tmp_path_factory.mktemp("uninterrupted")
    result = run_cli(["mlplab-train", *RUN], cwd, synthetic_data_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    return single_run_dir(cwd)


@pytest.mark.slow
def test_ctrl_c_mid_epoch_then_the_printed_command_resumes_it_exactly(uninterrupted, synthetic_data_dir, tmp_path):
    with_progress_lines = [override for override in PACED_RUN if override != "callbacks.progress_bar=null"]
    process = start(with_progress_lines, tmp_path, synthetic_data_dir)
    run_dir = wait_for_step(tmp_path, STEPS_PER_EPOCH + 50, process)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr[-3000:]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["status"] == "interrupted" and metrics["stopped_by"] == "SIGINT"
    assert STEPS_PER_EPOCH < metrics["step"] < 2 * STEPS_PER_EPOCH  # stopped in epoch 2, not at its end
    assert saved_step(run_dir / "checkpoints" / "last.ckpt") == metrics["step"]  # checkpoint taken where it stopped
    command = next(line for line in stderr.splitlines() if line.startswith("Resume with: ")).removeprefix(
        "Resume with: "
    )

    resumed = run_cli(shlex.split(command), tmp_path, synthetic_data_dir)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert single_run_dir(tmp_path) == run_dir  # the same directory, no new one
    assert_same_run(run_dir, uninterrupted)
    # The resumed epoch's line too, and no warning about the run's own checkpoint folder.
    lines = [line.split(":")[0] for line in resumed.stderr.splitlines() if line.startswith("epoch ")]
    assert lines == ["epoch 2/3", "epoch 3/3"]
    assert "exists and is not empty" not in resumed.stderr


@pytest.mark.slow
def test_killed_twice_and_resumed_twice_ends_as_the_uninterrupted_run(uninterrupted, synthetic_data_dir, tmp_path):
    process = start(PACED_RUN, tmp_path, synthetic_data_dir)
    run_dir = wait_for_step(tmp_path, STEPS_PER_EPOCH + 50, process)
    process.kill()  # SIGKILL: no chance to save; the periodic checkpoint at step 300 is what is left
    process.communicate(timeout=60)
    assert saved_step(run_dir / "checkpoints" / "last.ckpt") >= STEPS_PER_EPOCH
    # A write cut short leaves at most a hidden .partial file; last.ckpt itself is whole (loaded above).

    process = start([f"resume={run_dir}"], tmp_path, synthetic_data_dir)
    wait_for_step(tmp_path, 2 * STEPS_PER_EPOCH + 50, process)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 143 and "Resume with:" in stderr

    resumed = run_cli(["mlplab-train", f"resume={run_dir / 'checkpoints' / 'last.ckpt'}"], tmp_path, synthetic_data_dir)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_run(run_dir, uninterrupted)
    assert not list(run_dir.glob("checkpoints/.*partial"))  # what the kill left half-written is cleared away


@pytest.mark.parametrize(
    "signal_name, epoch, during",
    [("SIGTERM", 1, "validation"), ("SIGINT", 2, "validation"), ("SIGTERM", 2, "last step")],
)
@pytest.mark.slow
def test_a_signal_during_validation_or_an_epochs_last_step_stops_once_the_epoch_is_validated_and_resumes_exactly(
    signal_name, epoch, during, uninterrupted, synthetic_data_dir, tmp_path
):
    # At the epoch's last step, stopping right there would checkpoint an epoch whose validation a resumed run skips.
    probe = (
        f"+callbacks.signal_probe={{_target_:probes.SignalDuringValidation,signal_name:{signal_name},epoch:{epoch}}}"
        if during == "validation"
        else f"+callbacks.signal_probe={{_target_:probes.SignalAtStep,signal_name:{signal_name},"
        f"step:{(epoch + 1) * STEPS_PER_EPOCH}}}"
    )
    process = start([*RUN, probe], tmp_path, synthetic_data_dir)
    _, stderr = process.communicate(timeout=240)
    assert process.returncode == 128 + signal.Signals[signal_name].value, stderr[-3000:]
    run_dir = single_run_dir(tmp_path)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["status"] == "interrupted" and metrics["stopped_by"] == signal_name
    assert metrics["step"] == (epoch + 1) * STEPS_PER_EPOCH and len(metrics["history"]) == epoch + 1  # epoch finished
    assert saved_step(run_dir / "checkpoints" / "last.ckpt") == metrics["step"]
    assert "test/acc" not in metrics  # stopped before testing, even after the last epoch

    resumed = run_cli(["mlplab-train", f"resume={run_dir}"], tmp_path, synthetic_data_dir)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_run(run_dir, uninterrupted)


@pytest.mark.slow
def test_resume_refuses_changes_to_the_experiment_but_may_train_longer(uninterrupted, synthetic_data_dir, tmp_path):
    def records() -> dict[Path, int]:  # all but .lock, which a resume holds while it checks (mlplab.run.ownership)
        return {p: p.stat().st_mtime_ns for p in uninterrupted.rglob("*") if p.is_file() and p.name != ".lock"}

    before = records()
    refused = run_cli(["mlplab-train", f"resume={uninterrupted}", "model.width=64"], tmp_path, synthetic_data_dir)
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert "model.width=64 would change the experiment" in refused.stderr and "trainer.max_epochs" in refused.stderr
    assert records() == before

    missing = run_cli(["mlplab-train", f"resume={tmp_path / 'nowhere'}"], tmp_path, synthetic_data_dir)
    assert missing.returncode == 2 and "does not exist" in missing.stderr and "Traceback" not in missing.stderr


class CodeOnLoad:
    """Unpickling this creates a file: proof that loading ran code."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


@pytest.mark.slow
def test_checkpoints_that_would_run_code_or_are_damaged_are_refused(uninterrupted, synthetic_data_dir, tmp_path):
    marker = tmp_path / "code-ran"
    crafted = tmp_path / "crafted" / "checkpoints" / "last.ckpt"
    crafted.parent.mkdir(parents=True)
    torch.save({"state_dict": {}, "global_step": 1, "payload": CodeOnLoad(marker)}, crafted)
    truncated = tmp_path / "truncated" / "checkpoints" / "last.ckpt"
    truncated.parent.mkdir(parents=True)
    truncated.write_bytes((uninterrupted / "checkpoints" / "last.ckpt").read_bytes()[:5000])

    for command in (
        ["mlplab-train", f"resume={crafted}"],
        ["mlplab-eval", f"run={crafted}"],
        ["mlplab-predict", f"run={crafted}", "inputs=test"],
    ):
        result = run_cli(command, tmp_path, synthetic_data_dir)
        assert result.returncode == 2 and "refused, since loading it could run code" in result.stderr, command
        assert "Traceback" not in result.stderr
    assert not marker.exists()  # the payload never ran
    for command in (["mlplab-train", f"resume={truncated}"], ["mlplab-eval", f"run={truncated}"]):
        result = run_cli(command, tmp_path, synthetic_data_dir)
        assert (
            result.returncode == 2
            and "is not a readable checkpoint" in result.stderr
            and "Traceback" not in result.stderr
        )


@pytest.mark.slow
def test_an_unwritable_checkpoint_folder_is_one_clear_line(synthetic_data_dir, tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "checkpoints").write_text("a file where the checkpoint folder should be")  # no write can succeed
    result = run_cli(["mlplab-train", *SYNTHETIC_RUN, f"hydra.run.dir={run_dir}"], tmp_path, synthetic_data_dir)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    (line,) = [line for line in result.stderr.splitlines() if line.startswith("mlplab-train: error:")]
    assert "could not write the run's files" in line and "checkpoints" in line
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["status"] == "interrupted" and "checkpoints" in metrics["error"]  # resumable, not failed


@pytest.mark.slow
def test_killed_right_after_an_epoch_ends_resumes_without_doubled_points(uninterrupted, synthetic_data_dir, tmp_path):
    args = [*PACED_RUN, "checkpoint.every_n_steps=0"]  # only the checkpoints written when an epoch ends
    process = start(args, tmp_path, synthetic_data_dir)
    run_dir = wait_for_step(tmp_path, STEPS_PER_EPOCH, process)
    process.kill()
    process.communicate(timeout=60)
    resumed = run_cli(["mlplab-train", f"resume={run_dir}"], tmp_path, synthetic_data_dir)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_run(run_dir, uninterrupted)


@pytest.mark.slow
@pytest.mark.parametrize("written", [False, True], ids=["while-its-checkpoint-is-written", "once-it-is-written"])
def test_killed_right_after_an_epochs_views_and_checkpoint_were_queued_resumes_to_the_same_curves_and_images(
    written, uninterrupted, synthetic_data_dir, tmp_path
):
    marker = tmp_path / "killed"
    kill = f"+callbacks.kill={{_target_:probes.KillAtEpochEnd,epoch:1,marker:'{marker}',written:{written}}}"
    killed = run_cli(["mlplab-train", *RUN, kill], tmp_path, synthetic_data_dir)
    assert killed.returncode == -signal.SIGKILL and marker.exists(), killed.stderr[-3000:]
    run_dir = single_run_dir(tmp_path)
    # last.ckpt is whole: the epoch's own, or the one before it (step 200) if the background write had not finished
    assert saved_step(run_dir / "checkpoints" / "last.ckpt") in ((STEPS_PER_EPOCH,) if written else (200, 250))
    resumed = run_cli(["mlplab-train", f"resume={run_dir}"], tmp_path, synthetic_data_dir)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_run(run_dir, uninterrupted)
    # Every view the uninterrupted run drew, at the same steps, pixel for pixel: none lost, none drawn twice.
    ours, theirs = (EventAccumulator(str(folder), size_guidance={"images": 0}) for folder in (run_dir, uninterrupted))
    ours.Reload()
    theirs.Reload()
    assert ours.Tags()["images"] == theirs.Tags()["images"]
    assert {"val/confusion_matrix", "test/confusion_matrix"} <= set(theirs.Tags()["images"])
    for tag in theirs.Tags()["images"]:
        mine, reference = ours.Images(tag), theirs.Images(tag)
        assert [image.step for image in mine] == [image.step for image in reference], tag
        assert [image.encoded_image_string for image in mine] == [i.encoded_image_string for i in reference], tag


def test_a_read_only_place_for_runs_is_one_clear_line(synthetic_data_dir, tmp_path):
    read_only = Path("/sys")  # sysfs is mounted read-only here; refusing writes even to root
    try:
        (read_only / "mlplab-probe").mkdir()
    except OSError:
        pass
    else:
        (read_only / "mlplab-probe").rmdir()
        pytest.skip("/sys is writable on this machine")
    result = run_cli(["mlplab-train", *SYNTHETIC_RUN], read_only, synthetic_data_dir)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "mlplab-train: error: cannot write run directories under /sys" in result.stderr
    elsewhere = run_cli(
        ["mlplab-train", *SYNTHETIC_RUN, f"hydra.run.dir={read_only}/run"], tmp_path, synthetic_data_dir
    )
    assert elsewhere.returncode == 2 and "hydra.run.dir=<a writable path>" in elsewhere.stderr


@pytest.mark.slow
def test_a_second_signal_stops_at_once(synthetic_data_dir, tmp_path):
    # Steps of 20 s: one signal waits for the step to end (seconds away); a second must not.
    marker = tmp_path / "pace"
    pace = f"+callbacks.pace={{_target_:probes.PaceSteps,seconds:20,marker:'{marker}'}}"
    process = start([*RUN, pace], tmp_path, synthetic_data_dir)
    wait_for_file(Path(f"{marker}.paused"), process)  # training under way: inside the first step's pause
    process.send_signal(signal.SIGINT)
    wait_for_file(Path(f"{marker}.stopping"), process)  # the first signal heard
    second = time.monotonic()
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=60)
    assert time.monotonic() - second < 10, "the second signal waited for the step"
    assert process.returncode == 130 and "Traceback" not in stderr, stderr[-2000:]
    run_dir = single_run_dir(tmp_path)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["status"] == "interrupted" and metrics["step"] == 1  # stopped in the pause after the first step,
    assert not (
        run_dir / "checkpoints" / "last.ckpt"
    ).exists()  # before the checkpoint one signal would have waited for
