"""Every `mlplab-*` command line in README.md's code blocks, run, so the README cannot drift from the code.

The commands are parsed out of README.md: a new command there becomes a new case here, and a command this file
does not know how to run fails (``plan`` says why). How a command is run:

- **Every command** runs in a process forked from one that imported mlplab once (conftest's ``ForkedCli``, whose
  children run any of the four scripts' ``main()``), in a project folder of its own, with ``MLPLAB_DATA_DIR`` on the
  session's synthetic Fashion-MNIST (plus a synthetic MNIST beside it for ``data=mnist``). A command that trains is
  **shrunk** by appending ``SHRINK`` (conftest's ``SYNTHETIC_RUN`` plus two training batches and one validation and
  test batch), so it trains a few batches on the CPU; an override the README gives for the same key comes first, so
  the shrinking one wins. Not appended: ``trainer=cpu`` when the command chooses a trainer (``trainer=gpu`` is
  replaced by ``trainer=cpu`` on a machine without a GPU, and ``trainer=ddp`` gets ``trainer.accelerator=cpu``);
  ``data.val_size`` and the built-in sets' ``data.system_dir``/``data.download`` with ``data=folder`` or
  ``data=tensors`` (their own default must fit); anything to ``resume=`` (a resumed run keeps its own, already
  shrunk, config); anything to ``--help``. A search also gets ``hydra.sweeper.n_trials=2``. Commands that are the
  same once shrunk run once. The installed scripts themselves (the process boundary) are tested in test_cli.py.
- **Placeholders** are replaced by what an earlier command made: ``outputs/runs/<run>`` by a finished run,
  ``outputs/sweeps/<name>/<job overrides>`` by that sweep's job folder whose overrides include those (the shrinking
  adds its own to the folder's name), ``my-images`` and ``my-arrays.npz`` by a small image folder and tensor file.
  What a placeholder needs is made on demand, so a case also passes on its own (``-k``) or on another worker.
- **Shell set-up lines** in the same code block before a command (``mkdir``, ``printf``) run first, in bash.
- **Shown output**: after ``$ mlplab-...`` the lines the README shows must appear in the output; an
  ``mlplab-...: error:`` line means exit status 2.
- **Covered elsewhere**: a PostgreSQL storage, the SLURM launcher, the parallel launcher and data-parallel runs
  are run by the tests named in ``COVERED_ELSEWHERE`` (checked to exist by name), which says why.
"""

from __future__ import annotations

import ast
import json
import os
import re
import shlex
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import SYNTHETIC_RUN, ForkedCli
from PIL import Image

from mlplab.data.synthetic import learnable_images, write_mnist_like

REPOSITORY = Path(__file__).resolve().parents[1]
README = REPOSITORY / "README.md"
SCRIPTS = ("mlplab-train", "mlplab-eval", "mlplab-predict", "mlplab-report")
SUBMITTERS = ("sbatch",)  # a cluster's commands that run mlplab's: only ever run by another test (COVERED_ELSEWHERE)
SETUP_COMMANDS = ("mkdir", "printf")
SHRINK = [
    *SYNTHETIC_RUN,
    "trainer.limit_train_batches=2",
    "trainer.limit_val_batches=1",
    "trainer.limit_test_batches=1",
]
SEARCH_SHRINK = ["hydra.sweeper.n_trials=2"]
# Commands run by another test instead (tests/<file>::<name>, checked to exist): those that need a server this file
# does not start (PostgreSQL, a SLURM cluster), and those
# whose extra processes each import mlplab afresh (the parallel launcher's workers, a data-parallel run's second
# rank: about 20 s each on the 2-core machine), which the named tests run with the same launcher and trainer.
# Delete an entry to run that command here too.
COVERED_ELSEWHERE = {
    # the same search as test_search_seeds' stacked one, with the preset's longer trials
    "hydra.sweeper.seeds_per_trial=3": (
        "test_search_seeds.py::test_a_trial_scores_the_mean_of_its_seeds_job_by_job_and_stacked"
    ),
    # the many-node search: a SLURM array of search processes sharing a PostgreSQL study
    "sbatch --array": "test_slurm.py::test_the_readmes_search_over_many_nodes_shares_one_postgresql_study",
    "hydra.sweeper.storage=postgresql": (
        "test_slurm.py::test_the_readmes_search_over_many_nodes_shares_one_postgresql_study"
    ),
    # a real SLURM cluster (tests/slurm_cluster.py); the GPU partition's command is refused there: no such partition
    "hydra.launcher.wait=false": (
        "test_slurm.py::test_submit_and_return_then_a_cancelled_job_is_interrupted_and_the_same_command_resumes_only_it"
    ),
    "hydra/launcher=stacked_slurm": "test_slurm.py::test_a_stacked_sweep_runs_as_one_slurm_job",
    "hydra/launcher=slurm trainer=ddp": (
        "test_slurm.py::"
        "test_a_data_parallel_job_runs_as_two_slurm_tasks_and_tests_as_one_process_evaluates_its_best_checkpoint"
    ),
    "hydra.launcher.partition=gpu": (
        "test_slurm.py::test_a_request_the_cluster_cannot_satisfy_is_one_line_and_nothing_is_submitted"
    ),
    "hydra/launcher=slurm": (
        "test_slurm.py::test_a_cpu_sweep_runs_as_one_job_array_whose_preempted_and_time_limited_jobs_resume_to_uninterrupted_weights"
    ),
    "hydra/launcher=parallel": "test_sweep.py::test_parallel_launcher_gives_the_same_results_as_one_process",
    "trainer=ddp": "test_scale_out.py::test_ddp_run_has_one_directory_written_by_rank_zero",
}
# Commands that need an optional extra (pyproject.toml): skipped, with the reason, where it is not installed.
NEEDS_EXTRA = {"logger=wandb": ("wandb", "logger=wandb needs W&B, an optional extra: pip install 'mlplab[wandb]'")}
# Exit statuses other than 0 that the README itself promises, with where it says so.
EXPECTED_STATUS = {
    # docs/predict-example holds one file that is no image: reported, the others predicted, exit status 1.
    "mlplab-predict run=outputs/runs/<run> inputs=docs/predict-example top_k=3": 1,
}


@dataclass(frozen=True)
class Command:
    text: str  # as the README writes it, continuation lines joined, without its comment
    args: tuple[str, ...]
    setup: tuple[str, ...] = ()  # shell lines before it in its code block
    shown: tuple[str, ...] = ()  # output lines the README shows after it

    @property
    def script(self) -> str:
        return self.args[0]


def code_blocks(text: str) -> list[list[str]]:
    blocks, current = [], None
    for line in text.splitlines():
        if line.strip().startswith("```"):
            if current is None:
                current = []
            else:
                blocks.append(current)
                current = None
        elif current is not None:
            current.append(line.strip())
    return blocks


def readme_commands(text: str) -> list[Command]:
    commands = []
    for block in code_blocks(text):
        joined = []
        for line in block:
            if joined and joined[-1].endswith("\\"):
                joined[-1] = joined[-1][:-1].rstrip() + " " + line
            else:
                joined.append(line)
        setup, pending = [], None
        for line in joined:
            prompt = line.startswith("$ ")
            words = shlex.split(line.removeprefix("$ "), comments=True) if line else []
            if words and words[0] in (*SCRIPTS, *SUBMITTERS):
                if pending:
                    commands.append(pending)
                pending = Command(" ".join(words), tuple(words), tuple(setup))
                if not prompt:
                    commands.append(pending)
                    pending = None
            elif words and words[0] in SETUP_COMMANDS:
                setup.append(line)
            elif pending is not None and line:
                pending = Command(pending.text, pending.args, pending.setup, (*pending.shown, line))
        if pending:
            commands.append(pending)
    return commands


COMMANDS = readme_commands(README.read_text())


def has_gpu() -> bool:
    return torch.cuda.is_available()


def sets(args, key: str) -> bool:
    return any(arg.lstrip("+~").split("=", 1)[0] == key for arg in args)


@dataclass
class Plan:
    how: str  # "train" (forked mlplab-train), "script" (run_cli) or "elsewhere"
    args: list[str] = field(default_factory=list)
    covered_by: str = ""


def plan(command: Command) -> Plan:
    """How this file runs a README command, or a failure saying it does not know how."""
    for marker, test in COVERED_ELSEWHERE.items():
        if marker in command.text:
            return Plan("elsewhere", covered_by=test)
    unknown = set(re.findall(r"<[^>]+>", command.text)) - {"<run>"}
    if unknown or command.script not in SCRIPTS:
        pytest.fail(f"tests/test_readme.py does not know how to run {command.text!r} (placeholders {unknown})")
    args = list(command.args[1:])
    if command.script != "mlplab-train":
        return Plan("script", args)
    if "--help" in args or any(arg.startswith("resume=") for arg in args):
        return Plan("train", args)
    own_data = any(arg in ("data=folder", "data=tensors") for arg in args)
    shrink = []
    for override in SHRINK:
        key = override.split("=", 1)[0]
        if key == "trainer" and sets(args, "trainer"):
            continue
        if own_data and key in ("data.val_size", "data.system_dir", "data.download"):
            continue
        shrink.append(override)
    if not has_gpu():
        args = ["trainer=cpu" if arg == "trainer=gpu" else arg for arg in args]
        if "trainer=ddp" in args and not sets(args, "trainer.accelerator"):
            shrink.append("trainer.accelerator=cpu")
    if "hparams_search" in command.text or "hydra/sweeper=optuna" in command.text:
        shrink += SEARCH_SHRINK
    return Plan("train", [*args, *shrink])


class Project:
    """The folder a user runs the README's commands in; remembers what each distinct command line gave."""

    def __init__(self, folder: Path, data_dir: Path, cli: ForkedCli):
        self.folder, self.data_dir, self.cli = folder, data_dir, cli
        self.results: dict[tuple[str, ...], tuple[int, str]] = {}

    def run(self, args: list[str]) -> tuple[int, str]:
        key = tuple(sorted({arg.split("=", 1)[0]: arg for arg in args}.values()))  # the last value of a key wins
        if key not in self.results:
            tool, args = (args[0], args[1:]) if args[0] in SCRIPTS else ("mlplab-train", args)
            self.results[key] = self.cli.run(args, self.folder, tool=tool)
        return self.results[key]

    def a_finished_run(self) -> str:
        runs = self.folder / "outputs" / "runs"
        for run in sorted(runs.iterdir()) if runs.is_dir() else []:
            metrics = run / "metrics.json"
            if metrics.is_file() and json.loads(metrics.read_text())["status"] == "completed" and is_mlp(run):
                return str(run.relative_to(self.folder))
        code, output = self.run(["model.depth=1", *SHRINK])
        assert code == 0, output[-3000:]
        return self.a_finished_run()

    def job_folder(self, sweep: str, job: str) -> str:
        """The folder of that README sweep's job, the sweep run first if it has not been."""
        sweep_dir = self.folder / "outputs" / "sweeps" / sweep
        if not sweep_dir.is_dir():
            (maker,) = [c for c in COMMANDS if f"sweep={sweep}" in c.args and "dry_run=true" not in c.args]
            code, output = self.run(plan(maker).args)
            assert code == 0, output[-3000:]
        wanted = set(job.split(","))
        found = [path for path in sweep_dir.iterdir() if wanted <= set(path.name.split(","))]
        assert found, f"no job folder of {sweep_dir} has {job}"
        return str(min(found, key=lambda path: len(path.name)).relative_to(self.folder))

    def resolve(self, args: list[str]) -> list[str]:
        resolved = []
        for arg in args:
            if "outputs/runs/<run>" in arg:
                arg = arg.replace("outputs/runs/<run>", self.a_finished_run())
            match = re.search(r"outputs/sweeps/([^/\s]+)/([^/\s]+=[^/\s]+)", arg)
            if match and not (self.folder / match.group(0)).exists():
                arg = arg.replace(match.group(0), self.job_folder(match.group(1), match.group(2)))
            resolved.append(arg)
        return resolved


def is_mlp(run: Path) -> bool:
    config = (run / ".hydra" / "config.yaml").read_text()
    return "family: mlp" in config and "name: fashion_mnist" in config


def write_user_data(folder: Path) -> None:
    """my-images/<class>/<image>.png (no test split: data.test_size holds one out) and my-arrays.npz."""
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(3), 40)
    for i, (label, pixels) in enumerate(zip(labels, learnable_images(labels, (12, 12), rng))):
        (folder / "my-images" / f"class-{label}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels, "L").save(folder / "my-images" / f"class-{label}" / f"{i:04d}.png")
    np.savez(folder / "my-arrays.npz", images=learnable_images(labels, (12, 12), rng), labels=labels)


@pytest.fixture(scope="module")
def project(synthetic_data_dir, tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("readme-data")
    (data_dir / "FashionMNIST").symlink_to(synthetic_data_dir / "FashionMNIST")
    write_mnist_like(data_dir / "MNIST" / "raw")
    folder = tmp_path_factory.mktemp("readme-project")
    (folder / "docs").mkdir()
    (folder / "docs" / "predict-example").symlink_to(REPOSITORY / "docs" / "predict-example")
    write_user_data(folder)
    # The forked commands' parent takes its environment from here: the data, and W&B's own folders (logger=wandb)
    # in the project rather than the user's home.
    settings = {"MLPLAB_DATA_DIR": str(data_dir)}
    settings |= {
        name: str(folder / "wandb-home" / name) for name in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR")
    }
    before = {name: os.environ.get(name) for name in settings}
    os.environ.update(settings)
    try:
        cli = ForkedCli()
    finally:
        for name, value in before.items():
            os.environ.pop(name) if value is None else os.environ.update({name: value})
    yield Project(folder, data_dir, cli)
    cli.close()


def test_the_readme_has_commands_of_every_script():
    assert {command.script for command in COMMANDS} == {*SCRIPTS, *SUBMITTERS}
    assert len(COMMANDS) >= 20, [command.text for command in COMMANDS]


def test_tests_covering_commands_elsewhere_exist():
    for test in COVERED_ELSEWHERE.values():
        file, name = test.split("::")
        tree = ast.parse((Path(__file__).parent / file).read_text())
        assert name in {node.name for node in ast.walk(tree) if isinstance(node, ast.FunctionDef)}, test


def case(command: Command):
    return pytest.param(command, id=command.text)


@pytest.mark.slow
@pytest.mark.parametrize("command", [case(command) for command in COMMANDS])
def test_readme_command(command: Command, project: Project):
    how = plan(command)
    if how.how == "elsewhere":
        return  # test_tests_covering_commands_elsewhere_exist checks that the covering test is there
    for marker, (module, reason) in NEEDS_EXTRA.items():
        if marker in command.args:
            pytest.importorskip(module, reason=reason)
    for line in command.setup:
        subprocess.run(["bash", "-c", line], cwd=project.folder, check=True)
    args = project.resolve(how.args)
    code, output = project.run([command.script, *args] if how.how == "script" else args)
    shown_error = any(re.match(r"mlplab-\w+: error:", line) for line in command.shown)
    expected = 2 if shown_error else EXPECTED_STATUS.get(command.text, 0)
    assert code == expected, f"{shlex.join([command.script, *args])}\nexit status {code}\n{output[-4000:]}"
    flat = " ".join(output.split())
    for line in command.shown:
        assert " ".join(line.split()) in flat, f"README shows {line!r}; the command printed:\n{output[-4000:]}"
    if "hydra/launcher=stacked" in args:
        stacked_jobs_trained_as_stacks(project.folder / "outputs" / "sweeps", output)


def stacked_jobs_trained_as_stacks(sweeps: Path, output: str) -> None:
    """Every job of the stacked sweep just run completed inside a stack, not on its own."""
    assert "runs on its own" not in output, output[-3000:]
    newest = max((path for path in sweeps.iterdir() if path.is_dir()), key=lambda path: path.stat().st_mtime)
    for metrics in newest.glob("*/metrics.json"):
        record = json.loads(metrics.read_text())
        assert record["status"] == "completed" and record.get("stacked_jobs", 1) > 1, (metrics, record)
