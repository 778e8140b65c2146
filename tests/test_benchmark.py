"""The speed benchmark runs end to end in its tiny mode, so it cannot rot. Timings are not judged here."""

import json
import runpy
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARK = Path(__file__).resolve().parents[1] / "benchmarks" / "speed.py"
STACKED = BENCHMARK.with_name("stacked_engine.py")
BARE_STACK = BENCHMARK.with_name("bare_stack.py")


@pytest.mark.slow
def test_quick_benchmark_writes_every_part(tmp_path):
    result = subprocess.run(
        [sys.executable, str(BENCHMARK), "--quick", "--output", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    (path,) = tmp_path.glob("speed-cpu-quick-*.json")
    report = json.loads(path.read_text())
    contenders = {row["contender"] for row in report["epoch"]["table"]}
    assert contenders == {"bare loop", "bare loop, fused Adam", "mlplab", "torchvision DataLoader"}
    assert all(row["median_s"] > 0 and row["samples_per_s"] > 0 for row in report["epoch"]["table"])
    assert report["startup"]["first_step_seconds"] > 0 and report["startup"]["import_seconds"] > 0
    assert report["sweep"]["jobs"] == 3
    assert report["memory"]["peak_rss_mb"] > 0
    assert report["machine"]["cores"] >= 1 and "torch" in report["machine"]["packages"]
    assert "ratio" in result.stdout and "Start-up" in result.stdout
    answers = report["startup"]["answers"]["median_seconds"]
    assert set(answers) == {
        "python -c 'import torch'",
        "python -c 'import lightning'",
        "mlplab-train --help",
        "mlplab-train model.width=abc (refused)",
        "mlplab-train -m seed=1..8 dry_run=true",
        "mlplab-report <sweep of 4 jobs>",
    }
    assert all(seconds > 0 for seconds in answers.values())
    assert isinstance(report["machine"]["native_bf16"], bool) and isinstance(report["machine"]["cpu_flags"], list)


@pytest.mark.slow
def test_stacked_engine_benchmark_writes_its_table(tmp_path):
    result = subprocess.run(
        [sys.executable, str(STACKED), "--ks", "1", "2", "--steps", "2", "--repeats", "1", "--output", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    (path,) = tmp_path.glob("stacked-engine-cpu-*.json")
    rows = json.loads(path.read_text())["rows"]
    assert [row["k"] for row in rows] == [1, 2] and all(row["stacked_s"] > 0 and row["ratio"] > 0 for row in rows)


@pytest.mark.slow
def test_stacked_sweep_benchmark_writes_its_table(tmp_path):
    # stacked only (--alone-ks with none): tests/test_stacked_sweep.py compares stacked and job-by-job sweeps
    result = subprocess.run(
        [
            sys.executable,
            str(BENCHMARK.with_name("stacked_sweep.py")),
            "--quick",
            "--ks",
            "2",
            "--alone-ks",
            "--epochs",
            "1",
            "--output",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    (path,) = tmp_path.glob("stacked-sweep-cpu-*.json")
    (row,) = json.loads(path.read_text())["rows"]
    assert row["k"] == 2 and "alone" not in row and len(row["stacked"]["test_acc"]) == 2
    assert row["stacked"]["jobs_per_minute"] > 0 and row["stacked"]["epochs_per_second"] > 0
    assert "K" in result.stdout and "saved" in result.stdout


@pytest.mark.parametrize(
    "script", sorted(p.name for p in BENCHMARK.parent.glob("*.py") if p.name != "startup_probe.py")
)
def test_each_benchmark_answers_help_without_running(script, tmp_path, monkeypatch, capsys):
    """``--help`` describes the benchmark and stops: no timing, no file written. Run as ``python <script> --help``
    runs it, in this process (which has torch imported already)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", [script, "--help"])
    with pytest.raises(SystemExit) as stop:
        runpy.run_path(str(BENCHMARK.parent / script), run_name="__main__")
    assert stop.value.code == 0
    assert capsys.readouterr().out.startswith("usage:")
    assert list(tmp_path.iterdir()) == []


def test_the_simplest_stacked_loop_trains_every_network_it_is_given(tmp_path):
    from mlplab.data.synthetic import write_mnist_like

    write_mnist_like(tmp_path / "raw")
    command = [sys.executable, str(BARE_STACK), "--data-dir", str(tmp_path / "raw"), "--val-size", "100"]
    command += ["--depths", "1", "2", "--widths", "8", "16", "--seeds", "1", "2", "--epochs", "2", "--batch-size", "50"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.splitlines()[-1])
    assert report["networks"] == 8 and len(report["val_acc"]) == len(report["test_acc"]) == 8
    assert all(0 <= acc <= 1 for acc in report["test_acc"]) and max(report["test_acc"]) > 0.3  # it learned


def test_every_benchmark_is_checked():
    assert len([p for p in BENCHMARK.parent.glob("*.py") if p.name != "startup_probe.py"]) == 8
