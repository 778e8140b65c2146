"""The console scripts as a user runs them, in subprocesses, on synthetic data."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import SYNTHETIC_RUN, composed, run_cli, single_run_dir
from omegaconf import OmegaConf
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator


def scalars(run_dir: Path) -> dict[str, list[float]]:
    events = EventAccumulator(str(run_dir))
    events.Reload()
    return {tag: [e.value for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


@pytest.fixture(scope="module")
def trained_run(synthetic_data_dir, tmp_path_factory) -> Path:
    cwd = tmp_path_factory.mktemp("train")
    # The installed script in a new interpreter, as a user starts it (other tests fork it: conftest.run_cli).
    result = run_cli(
        ["mlplab-train", *SYNTHETIC_RUN, "trainer.max_epochs=2", "model.width=64"], cwd, synthetic_data_dir, fresh=True
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return single_run_dir(cwd)


@pytest.mark.slow
def test_train_writes_config_events_checkpoints_and_metrics(trained_run):
    config = (trained_run / ".hydra" / "config.yaml").read_text()
    assert "width: 64" in config
    curves = scalars(trained_run)
    for tag in ("train/loss", "train/acc", "val/loss", "val/acc", "test/acc", "test/loss"):
        assert tag in curves, sorted(curves)
    assert len(curves["val/acc"]) == 2 and len(curves["train/loss"]) == 2  # one point per epoch, no extra
    assert not any(tag.startswith("hp_metric") for tag in curves)
    assert {p.name for p in (trained_run / "checkpoints").iterdir()} == {"best.ckpt", "last.ckpt"}

    metrics = json.loads((trained_run / "metrics.json").read_text())
    assert metrics["status"] == "completed" and metrics["epochs"] == 2
    assert metrics["val/acc"] == max(curves["val/acc"])
    assert metrics["test/acc"] == pytest.approx(curves["test/acc"][-1])
    assert metrics["test/acc"] > 0.5  # the synthetic classes are learnable; chance is 0.1
    assert metrics["num_parameters"] == 784 * 64 + 64 + 64 * 64 + 64 + 64 * 10 + 10
    assert metrics["wall_seconds"] > 0 and metrics["best_checkpoint"] == "checkpoints/best.ckpt"


@pytest.mark.slow
def test_a_run_prints_no_lightning_notes_a_user_cannot_act_on(synthetic_data_dir, tmp_path):
    # bf16-mixed as trainer.precision=auto picks it on a bf16 CPU or GPU: the model summary would remark on it
    args = [*SYNTHETIC_RUN, "trainer.limit_train_batches=2", "trainer.precision=bf16-mixed"]
    result = run_cli(["mlplab-train", *args], tmp_path, synthetic_data_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    output = result.stdout + result.stderr
    for note in ("Tip:", "litlogger", "Trainer already configured with model summary", "was configured so"):
        assert note not in output
    assert "is not supported by the model summary" not in output
    assert "srun" not in output  # Lightning's hint on a machine with SLURM installed (CI installs it)
    assert "Finished: test/acc" in output  # mlplab's own report is still there


@pytest.mark.parametrize(
    "precision, dtype", [("bf16-true", torch.bfloat16), ("64-true", torch.float64), ("16-true", torch.float16)]
)
@pytest.mark.slow
def test_every_offered_true_precision_trains_and_evaluates(precision, dtype, synthetic_data_dir, tmp_path):
    result = run_cli(
        [
            "mlplab-train",
            *SYNTHETIC_RUN,
            f"trainer.precision={precision}",
            "trainer.limit_train_batches=3",
            "model.width=32",
            "+optimizer.eps=1e-4",  # Adam's default 1e-8 is 0 in float16: a step on a zero gradient would be inf
        ],
        tmp_path,
        synthetic_data_dir,
    )
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr[-3000:]
    run_dir = single_run_dir(tmp_path)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["status"] == "completed" and 0 <= metrics["test/acc"] <= 1
    weights = torch.load(run_dir / "checkpoints" / "best.ckpt", weights_only=True)["state_dict"]
    assert weights["network.1.weight"].dtype == dtype  # trained in that precision, not silently in float32
    evaluated = run_cli(
        ["mlplab-eval", f"run={run_dir}", "format=json", "accelerator=cpu"], tmp_path, synthetic_data_dir
    )
    assert evaluated.returncode == 0, evaluated.stderr[-2000:]


@pytest.mark.slow
def test_progress_off_a_terminal_is_one_line_per_epoch(synthetic_data_dir, tmp_path):
    args = [arg for arg in SYNTHETIC_RUN if not arg.startswith("callbacks.progress_bar")]
    result = run_cli(["mlplab-train", *args, "trainer.max_epochs=3"], tmp_path, synthetic_data_dir)  # output: pipes
    assert result.returncode == 0, result.stderr[-3000:]
    assert "\r" not in result.stdout + result.stderr  # no bar redrawn in place
    lines = [line for line in result.stderr.splitlines() if line.startswith("epoch ")]
    assert [line.split(":")[0] for line in lines] == ["epoch 1/3", "epoch 2/3", "epoch 3/3"]
    assert all("train/loss" in line and "val/acc" in line for line in lines)


@pytest.mark.slow
def test_checkpoint_holds_plain_values_and_loads_without_hydra(trained_run):
    checkpoint = trained_run / "checkpoints" / "best.ckpt"
    state = torch.load(checkpoint, weights_only=True)
    assert (
        state["hyper_parameters"]["backbone"]["width"] == 64
        and state["hyper_parameters"]["class_names"][1] == "Trouser"
    )
    code = (
        # Hydra's imports would fail
        "import sys, torch; sys.modules['hydra'] = None; sys.modules['omegaconf'] = None\n"
        "from mlplab.model.classifier import ImageClassifier\n"
        f"model = ImageClassifier.from_checkpoint(torch.load({str(checkpoint)!r}, weights_only=True))\n"
        "print(sum(p.numel() for p in model.network.parameters()))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert int(result.stdout.split()[-1]) == json.loads((trained_run / "metrics.json").read_text())["num_parameters"]


@pytest.mark.slow
def test_eval_reproduces_the_recorded_test_accuracy(trained_run, synthetic_data_dir, tmp_path):
    result = run_cli(
        ["mlplab-eval", f"run={trained_run}", "format=json", "accelerator=cpu"], tmp_path, synthetic_data_dir
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout)
    recorded = json.loads((trained_run / "metrics.json").read_text())
    assert report["test/acc"] == recorded["test/acc"] and report["test/loss"] == pytest.approx(recorded["test/loss"])
    assert "note" not in report  # the run tested on the whole test set, as eval does
    assert list(tmp_path.iterdir()) == []  # eval writes nothing where it runs

    by_file = run_cli(["mlplab-eval", f"run={trained_run / 'checkpoints' / 'best.ckpt'}"], tmp_path, synthetic_data_dir)
    assert by_file.returncode == 0, by_file.stderr[-2000:]
    table = dict(line.rsplit(None, 1) for line in by_file.stdout.splitlines() if line.strip())  # "key  value" rows
    assert float(table["test/acc"]) == pytest.approx(recorded["test/acc"], abs=5e-5)  # printed with 4 decimals
    assert float(table["recorded test/acc"]) == pytest.approx(recorded["test/acc"], abs=5e-5)
    assert table["checkpoint"].endswith("checkpoints/best.ckpt")


def test_checkpoint_records_the_data_setup_eval_rebuilds(trained_run):
    """The run used batch size 50 and val_size 100; today's defaults (128, 5000) could not even split 600 samples,
    so the exact reproduction in the eval test above also shows eval took these recorded values."""
    state = torch.load(trained_run / "checkpoints" / "best.ckpt", weights_only=True)
    assert state["datamodule_hyper_parameters"]["batch_size"] == 50
    assert state["datamodule_hyper_parameters"]["val_size"] == 100


@pytest.mark.slow
def test_runs_started_in_the_same_second_get_their_own_directories(forked_cli, synthetic_data_dir, tmp_path):
    # The default run directory with its time part pinned: the two runs surely share that second.
    default = OmegaConf.to_container(composed(hydra=True).hydra.run)["dir"]  # unresolved
    new_run = "outputs/runs/${now:%Y-%m-%d_%H-%M-%S}_${mlplab.pid:}"
    assert new_run in default  # a new run's directory, as pinned below
    pinned = new_run.replace("${now:%Y-%m-%d_%H-%M-%S}", "2026-01-01_00-00-00")
    args = [*SYNTHETIC_RUN, "trainer.limit_train_batches=2", f"hydra.run.dir={pinned}"]
    results = forked_cli.run_together([args, args], tmp_path, {"MLPLAB_DATA_DIR": str(synthetic_data_dir)})
    assert [code for code, _, _ in results] == [0, 0], results[0][2][-2000:]
    run_dirs = sorted((tmp_path / "outputs" / "runs").iterdir())
    assert len(run_dirs) == 2 and all(d.name.startswith("2026-01-01_00-00-00_") for d in run_dirs)
    for run_dir in run_dirs:  # each run whole in its own directory
        assert json.loads((run_dir / "metrics.json").read_text())["status"] == "completed"
        assert {p.name for p in (run_dir / "checkpoints").iterdir()} == {"best.ckpt", "last.ckpt"}


BAD_INPUTS = [  # (override, the key the message must name, what it must say is allowed)
    ("model.depth=-1", "model.depth", ">= 0"),
    ("model.width=0", "model.width", ">= 1"),
    ("model.width=abc", "model.width", "a list of integers"),
    ("data=nope", "data=nope", "cifar10, fashion_mnist, folder, kmnist, mnist, tensors"),
    ("optimizer.lr=-1", "optimizer.lr", "> 0"),
    ("+model.depht=3", "model.depht", "depth, width, activation"),
    ("trainer.max_epochs=many", "trainer.max_epochs", "an integer"),
    ("model.width=[64,", "model.width=[64,", "\"key='a, b'\""),  # Hydra's grammar cannot read it
    (
        "model.width=1000000",
        "model.width",
        "choose a smaller model.width or model.depth",
    ),  # 10^12 parameters: no memory for it
    ("model.depht=3", "model.depht", "depth, width, activation"),  # Hydra refuses it while composing
    ("optimizer.momentum=0.5", "optimizer.momentum", "options that have it: sgd"),  # not in optimizer=adam
    ("model.depth=${oops}", "model.depth", "Interpolation key 'oops' not found"),  # fails once resolved
    ("trainer.limit_train_batches=0.05", "trainer.limit_train_batches", "at least 0.1"),  # of 10 batches: none
    ("optimizer.lr=1e400", "optimizer.lr", "a finite number, got inf"),  # beyond a double: inf
    ("model.dropout=nan", "model.dropout", "a finite number, got nan"),
    ("label_smoothing=1.5", "label_smoothing", "0 <= s < 1"),
    ("model.norm=group", "model.norm", "none, batch, layer"),
    ("trainer.gradient_clip_val=inf", "trainer.gradient_clip_val", "a finite number, got inf"),
    ("+trainer.no_such_flag=1", "trainer.no_such_flag", "allowed: accelerator"),  # not a Lightning argument
    ("+trainer.acumulate_grad_batches=2", "trainer.acumulate_grad_batches", "did you mean accumulate_grad_batches"),
    ("+trainer.logger=false", "trainer.logger", "logger=tensorboard|csv|mlflow|none"),  # mlplab sets it
    ("trainer.max_time=soon", "trainer.max_time", "DD:HH:MM:SS"),  # checked before Lightning prints its banners
    ("optimizer._target_=torch.optim.Nope", "optimizer._target_", "a torch.optim optimizer class"),
    ("+optimizer.bettas=[0.9,0.99]", "optimizer.bettas", "did you mean betas"),
    ("scheduler._target_=torch.nn.Linear", "scheduler._target_", "torch.optim.lr_scheduler"),
    ("callbacks=swa callbacks.swa.swa_epoch_start=1.0", "callbacks.swa: swa_epoch_start", "0 < s < 1"),  # two
]
if not torch.cuda.is_available():
    BAD_INPUTS.append(("trainer=gpu", "trainer.accelerator=gpu", "trainer=cpu"))


@pytest.mark.slow
@pytest.mark.parametrize("override, key, allowed", BAD_INPUTS, ids=[o for o, _, _ in BAD_INPUTS])
def test_bad_input_is_one_clear_message_and_no_training(
    override, key, allowed, forked_cli, synthetic_data_dir, tmp_path
):
    # mlplab-train's main() in a process forked from one that imported it (tests/forked_cli.py): the console
    # script's code path without its seconds of imports for each of these.
    # An entry may hold several overrides, separated by spaces.
    code, output = forked_cli.run([*SYNTHETIC_RUN, f"paths.data_dir={synthetic_data_dir}", *override.split()], tmp_path)
    assert code == 2
    assert "Traceback" not in output and "GPU available" not in output
    (message,) = [line for line in output.splitlines() if "error" in line]
    assert message.startswith("mlplab-train: error: ") and key in message and allowed in message
    assert not list(tmp_path.glob("outputs/runs/*"))  # no training started, and no empty run directory left


@pytest.mark.slow
def test_missing_dataset_says_where_it_looked_and_how_to_provide_it(tmp_path):
    empty = tmp_path / "empty-data"
    result = run_cli(["mlplab-train", *SYNTHETIC_RUN, f"data.system_dir={tmp_path / 'no-package'}"], tmp_path, empty)
    assert result.returncode != 0 and "Traceback" not in result.stdout + result.stderr
    message = [line for line in result.stderr.splitlines() if "error" in line]
    assert len(message) == 1 and "Fashion-MNIST" in message[0] and str(empty) in message[0]
    assert "dataset-fashion-mnist" in message[0]


@pytest.mark.slow
def test_help_lists_groups_options_and_examples(tmp_path):
    result = run_cli(["mlplab-train", "--help"], tmp_path)
    assert result.returncode == 0
    for line in (
        "model: article, cnn, linear, mlp",
        "data: cifar10, fashion_mnist, folder, kmnist, mnist, tensors",
        "optimizer: adam, adamw, sgd",
        "scheduler: cosine, none, onecycle, plateau, step, warmup_cosine",
        "logger: csv, mlflow, none, tensorboard, tensorboard_mlflow, tensorboard_wandb, wandb",
        "trainer: auto, cpu, ddp, default, gpu",
        "mlplab-train -m",
    ):
        assert line in result.stdout
    module_help = subprocess.run(
        [sys.executable, "-m", "mlplab.cli.train", "--help"], capture_output=True, text=True, cwd=tmp_path
    )
    assert module_help.returncode == 0 and "model: article, cnn, linear, mlp" in module_help.stdout


@pytest.mark.slow
def test_diverging_run_stops_at_the_step_with_a_hint_and_keeps_no_nan_weights(synthetic_data_dir, tmp_path):
    result = run_cli(
        ["mlplab-train", *SYNTHETIC_RUN, "optimizer.lr=1e30", "trainer.max_epochs=3"], tmp_path, synthetic_data_dir
    )
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "mlplab-train: diverged: train/loss became" in result.stderr and "lower optimizer.lr" in result.stderr
    run_dir = single_run_dir(tmp_path)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert (
        metrics["status"] == "diverged" and f"at step {metrics['step'] + 1} " in metrics["error"]
    )  # before that step ran
    assert metrics["step"] < 10  # stopped at once, not at the end of the epoch (10 steps)
    for checkpoint in run_dir.glob("checkpoints/*.ckpt"):
        weights = torch.load(checkpoint, weights_only=True)["state_dict"]
        assert all(torch.isfinite(tensor).all() for tensor in weights.values())


def test_hydra_flags_and_launcher_plugins_are_understood(tmp_path):
    shown = run_cli(["mlplab-train", "--cfg", "job", "-p", "model"], tmp_path)  # "job" and "model" are flag values
    assert shown.returncode == 0 and "depth: 2" in shown.stdout, shown.stderr[-2000:]
    both = run_cli(["mlplab-train", "-m", "seed=1", "--cfg", "job"], tmp_path)
    assert both.returncode == 2 and both.stderr.strip() == (
        "mlplab-train: error: Only one of --run, --multirun, --cfg, --info and --shell_completion can be specified"
    )
    unknown = run_cli(["mlplab-train", "-m", "hydra/launcher=nope", "seed=1"], tmp_path)
    (line,) = unknown.stderr.splitlines()
    assert unknown.returncode == 2 and "parallel" in line and "slurm" in line and "submitit_local" in line
