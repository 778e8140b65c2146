"""Commands that train nothing answer without Lightning: help, a refused value, a dry run and mlplab-report each
run in a fresh interpreter, which must end without lightning, torchmetrics or torchvision imported (their import
is most of the seconds a command waits before it does anything: benchmarks/speed.py's start-up part)."""

import subprocess
import sys

import pytest
from conftest import cli_env
from test_summary import JOBS, write_sweep

TRAINING_LIBRARIES = ("lightning", "torchmetrics", "torchvision")
# Runs a console script's main() as its entry point does, then says which of the libraries it imported.
PROBE = """
import atexit, sys
atexit.register(lambda: print("imported:", *sorted({{m.split(".")[0] for m in sys.modules}} & set(LIBRARIES))))
LIBRARIES = {libraries!r}
sys.argv = [{tool!r}, *sys.argv[1:]]
from mlplab.cli.{module} import main
main()
"""


def imported(tool: str, module: str, args: list[str], cwd) -> tuple[subprocess.CompletedProcess, list[str]]:
    code = PROBE.format(libraries=TRAINING_LIBRARIES, tool=tool, module=module)
    result = subprocess.run(
        [sys.executable, "-c", code, *args], cwd=cwd, env=cli_env(), capture_output=True, text=True, timeout=300
    )
    line = next(line for line in result.stdout.splitlines() if line.startswith("imported:"))
    return result, line.split()[1:]


@pytest.mark.parametrize(
    "tool, module, text",
    [
        ("mlplab-train", "train", "Usage: mlplab-train"),
        ("mlplab-eval", "evaluate", "evaluate is powered by Hydra."),
        ("mlplab-predict", "predict", "predict is powered by Hydra."),
    ],
)
@pytest.mark.slow
def test_help_answers_without_lightning(tool, module, text, tmp_path):
    result, libraries = imported(tool, module, ["--help"], tmp_path)
    assert result.returncode == 0 and text in result.stdout, result.stderr[-2000:]
    assert libraries == []


@pytest.mark.parametrize(
    "args, message",
    [
        (["model.width=abc"], "model.width must be an integer or a list of integers, got 'abc'"),
        (["optimizer.lr=-1"], "optimizer.lr must be a number > 0, got -1"),
        (["model.nosuch=1"], "model.nosuch"),  # refused by Hydra: not in the config
    ],
)
@pytest.mark.slow
def test_a_refused_value_answers_without_lightning(args, message, tmp_path):
    result, libraries = imported("mlplab-train", "train", args, tmp_path)
    assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr
    assert libraries == []
    assert not (tmp_path / "outputs" / "runs").exists() or not any((tmp_path / "outputs" / "runs").iterdir())


@pytest.mark.slow
def test_a_dry_run_of_a_sweep_answers_without_lightning(tmp_path):
    args = ["-m", "seed=1,2,3,4,5,6,7,8", "dry_run=true", "sweep=dry"]
    result, libraries = imported("mlplab-train", "train", args, tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "8 jobs" in result.stdout + result.stderr
    assert libraries == []


def test_mlplab_report_answers_without_lightning(tmp_path):
    sweep_dir = tmp_path / "sweep"
    write_sweep(sweep_dir, JOBS)
    result, libraries = imported("mlplab-report", "report", [str(sweep_dir)], tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert (sweep_dir / "summary.md").is_file() and "model.width=128" in result.stdout
    assert libraries == []
