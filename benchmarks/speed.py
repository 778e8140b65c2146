#!/usr/bin/env python
"""Training speed of mlplab against a bare PyTorch loop and the classic torchvision pipeline.

    python benchmarks/speed.py                                  # CPU: batch 64, 128, 512; 3 interleaved repeats
    python benchmarks/speed.py --device cuda --batch-sizes 128 1024 --parts epoch
    python benchmarks/speed.py --quick                          # tiny synthetic data, seconds: checks the script

One epoch, for every contender, is a training pass over the training split (55000 samples) and an evaluation
pass over the validation split (5000), same network (depth 2, width 512), Adam at 1e-3, same batch size.
mlplab runs its real code path (config composed as mlplab-train does, its data module, Lightning module and
Trainer) with TensorBoard logging and checkpointing on and the progress bar off. Each repeat trains 3 epochs
and times the last 2 (the first warms up); the classic pipeline, only for context, times 1 epoch per repeat.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from datetime import datetime
from importlib.metadata import version
from pathlib import Path

import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from lightning.pytorch import Callback
from omegaconf import OmegaConf
from torch.utils.data import DataLoader, Subset
from torchvision import transforms
from torchvision.datasets import FashionMNIST

from mlplab.cli.compose import CONFIG_DIR
from mlplab.cli.instantiate import build_callbacks, build_logger
from mlplab.data.datamodule import channel_stats, split_off_validation
from mlplab.data.datasets import DataUnavailableError, load_dataset, provide_files
from mlplab.data.synthetic import write_mnist_like
from mlplab.model.backbones.mlp import MLP
from mlplab.run.config import parse_run_config
from mlplab.run.precision import CPU_BF16_FLAGS, fast_bf16
from mlplab.run.train import train

HERE = Path(__file__).resolve().parent
BIN = Path(sys.executable).parent
SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")
VAL_SIZE, SPLIT_SEED = 5000, 0
FUSED = "bare loop, fused Adam"
# The reference is Adam as tutorials write it (torch's default implementation); mlplab uses the fused kernel,
# so the same loop with fused=True is shown beside it, to separate framework cost from kernel choice.
BARE_LOOPS = ("bare loop", FUSED)
# With --precision other than 32-true, also the fused loop in bf16 autocast: what the arithmetic alone costs there.
BF16 = "bare loop, bf16 autocast"


def bare_loop_names(args: argparse.Namespace) -> tuple[str, ...]:
    """The bare loops timed beside mlplab; the bf16 one only where bf16 is native (else both would be emulated)."""
    if args.precision == "32-true":
        return BARE_LOOPS
    if not fast_bf16(args.device == "cuda"):
        print(
            f"bf16 is not native here (no {' or '.join(CPU_BF16_FLAGS)}): no bf16 comparison; "
            "mlplab's runs still use --precision"
        )
        return BARE_LOOPS
    return (*BARE_LOOPS, BF16)


def main() -> None:
    # Lightning 2.6's own use of a torch API deprecated in torch 2.10; nothing to act on here.
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")
    args = parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="mlplab-bench-"))
    data_dir, source = provide_data(args, workdir)
    print(
        f"data: {source} ({data_dir}); device {args.device}; {os.cpu_count()} cores, "
        f"torch threads {torch.get_num_threads()}"
    )
    result = {"machine": machine(args.device), "data": source, "args": vars(args) | {"output": str(args.output)}}
    if "epoch" in args.parts:
        result["epoch"] = bench_epochs(args, data_dir, workdir)
    if "startup" in args.parts:
        result["startup"] = bench_startup(args, data_dir, workdir)
    if "sweep" in args.parts:
        result["sweep"] = bench_sweep(args, data_dir, workdir)
    if "memory" in args.parts:
        result["memory"] = bench_memory(args, data_dir, workdir)
    args.output.mkdir(parents=True, exist_ok=True)
    path = (
        args.output / f"speed-{args.device}-{'quick-' if args.quick else ''}{datetime.now():%Y-%m-%dT%H%M}.json"
    )  # never overwrites an earlier result
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwritten: {path}")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[64, 128, 512])
    parser.add_argument("--repeats", type=int, default=3, help="repeats of every measurement, interleaved")
    parser.add_argument("--timed-epochs", type=int, default=3, help="epochs timed per repeat (after one warm-up epoch)")
    parser.add_argument(
        "--parts",
        nargs="+",
        default=["epoch", "startup", "sweep", "memory"],
        choices=["epoch", "startup", "sweep", "memory"],
    )
    parser.add_argument("--no-classic", action="store_true", help="leave out the torchvision DataLoader pipeline")
    parser.add_argument(
        "--precision",
        default="32-true",
        help="mlplab's trainer.precision (auto: bf16-mixed where native); the bare loops stay fp32",
    )
    parser.add_argument(
        "--quick", action="store_true", help="tiny synthetic data and one repeat: checks the script runs"
    )
    parser.add_argument("--output", type=Path, default=HERE / "results", help="folder for the JSON result")
    args = parser.parse_args()
    if args.quick:
        args.batch_sizes, args.repeats, args.timed_epochs = [64], 1, 2
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA GPU is visible")
    args.bare_loops = bare_loop_names(args)
    return args


def provide_data(args: argparse.Namespace, workdir: Path) -> tuple[Path, str]:
    """Real Fashion-MNIST when this machine has it, else synthetic data of the same shape (tiny with --quick)."""
    if not args.quick:
        data_dir = Path(os.environ.get("MLPLAB_DATA_DIR", "data")).resolve()
        try:
            provide_files("fashion_mnist", data_dir, SYSTEM_DIR, download=False)
            return data_dir, "real Fashion-MNIST"
        except DataUnavailableError:
            pass
    data_dir = workdir / "data"
    n_train, n_test = (2000, 500) if args.quick else (60000, 10000)
    write_mnist_like(data_dir / "FashionMNIST" / "raw", n_train=n_train, n_test=n_test)
    return data_dir, f"synthetic Fashion-MNIST shape ({n_train} train, {n_test} test)"


def val_size(args: argparse.Namespace) -> int:
    return 200 if args.quick else VAL_SIZE


def run_overrides(args: argparse.Namespace, data_dir: Path, batch_size: int) -> list[str]:
    return [
        f"paths.data_dir={data_dir}",
        f"data.batch_size={batch_size}",
        f"data.val_size={val_size(args)}",
        f"trainer.accelerator={'gpu' if args.device == 'cuda' else 'cpu'}",
        "trainer.devices=1",
        "data.system_dir=null",
        "data.download=false",
        "callbacks.progress_bar=null",
        f"trainer.precision={args.precision}",
    ]


# --- per-epoch time ---------------------------------------------------------------------------------------------


def bench_epochs(args, data_dir: Path, workdir: Path) -> dict:
    """Bare loop and mlplab alternate epoch by epoch in one process; the classic pipeline runs between repeats."""
    names = [*args.bare_loops, "mlplab"] + ([] if args.no_classic else ["torchvision DataLoader"])
    samples: dict[int, dict[str, list[float]]] = {bs: {name: [] for name in names} for bs in args.batch_sizes}
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    for repeat in range(args.repeats):
        for batch_size in args.batch_sizes:
            timed = time_bare_and_mlplab(args, data_dir, workdir, batch_size, args.timed_epochs)
            line = f"  repeat {repeat + 1}/{args.repeats}  batch {batch_size:>4}"
            for name, seconds in timed.items():
                samples[batch_size][name] += seconds
                line += f"  {name}: {fmt(seconds)}"
            if not args.no_classic:
                classic = time_classic(args, data_dir, batch_size)
                samples[batch_size]["torchvision DataLoader"].append(classic)
                line += f"  torchvision DataLoader {classic:.3f}"
            print(line + "  s/epoch", flush=True)
    n_train = len(load_dataset("fashion_mnist", data_dir).train) - val_size(args)
    table = []
    for batch_size, by_name in samples.items():
        reference = by_name["bare loop"]
        for name, values in by_name.items():
            median = statistics.median(values)
            row = {
                "batch_size": batch_size,
                "contender": name,
                "median_s": median,
                "min_s": min(values),
                "max_s": max(values),
                "samples_per_s": n_train / median,
                "ratio_to_bare": median / statistics.median(reference),
                "seconds": values,
            }
            if len(values) == len(reference):  # measured epoch by epoch next to the bare loop
                row["paired_ratio_to_bare"] = statistics.median(v / r for v, r in zip(values, reference))
            if name == "mlplab":  # the framework's own cost, with the same optimizer kernel on both sides
                fused = by_name[FUSED]
                row["ratio_to_fused_bare"] = median / statistics.median(fused)
                row["paired_ratio_to_fused_bare"] = statistics.median(v / r for v, r in zip(values, fused))
                if BF16 in by_name:  # mlplab in bf16 (--precision) against the same loop in bf16 autocast
                    bf16 = by_name[BF16]
                    row["ratio_to_bf16_bare"] = median / statistics.median(bf16)
                    row["paired_ratio_to_bf16_bare"] = statistics.median(v / r for v, r in zip(values, bf16))
            table.append(row)
    print(
        f"\nSeconds per epoch ({args.device}; {len(samples[args.batch_sizes[0]]['mlplab'])} epochs of each, "
        "alternating,"
        f" in {args.repeats} repeats; spread = min..max; ratio = median / bare loop's median;"
        f" paired = median of each epoch's ratio to the bare epoch just before it)"
    )
    print(
        f"{'batch':>5}  {'contender':<24} {'median s':>9} {'spread':>15} {'samples/s':>10} {'ratio':>6} {'paired':>6}"
    )
    for row in table:
        spread = f"{row['min_s']:.3f}..{row['max_s']:.3f}"
        paired = f"{row['paired_ratio_to_bare']:6.3f}" if "paired_ratio_to_bare" in row else f"{'':6}"
        print(
            f"{row['batch_size']:>5}  {row['contender']:<24} {row['median_s']:9.3f} {spread:>15} "
            f"{row['samples_per_s']:10.0f} {row['ratio_to_bare']:6.3f} {paired}"
        )
    for row in table:
        if "ratio_to_fused_bare" in row:
            print(
                f"batch {row['batch_size']:>4}: mlplab / bare loop with fused Adam (framework cost alone): "
                f"ratio {row['ratio_to_fused_bare']:.3f}, paired {row['paired_ratio_to_fused_bare']:.3f}"
            )
        if "ratio_to_bf16_bare" in row:
            print(
                f"batch {row['batch_size']:>4}: mlplab / bare loop in bf16 autocast with fused Adam: "
                f"ratio {row['ratio_to_bf16_bare']:.3f}, paired {row['paired_ratio_to_bf16_bare']:.3f}"
            )
    return {"training_samples": n_train, "table": table}


def fmt(values: list[float]) -> str:
    return " ".join(f"{v:.3f}" for v in values)


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def train_epoch(model, optimizer, batches, device: str, bf16: bool = False) -> None:
    model.train()
    for images, labels in batches:
        with torch.autocast(device, dtype=torch.bfloat16, enabled=bf16):
            loss = F.cross_entropy(model(images.to(device, non_blocking=True)), labels.to(device, non_blocking=True))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()


def evaluate_epoch(model, batches, device: str, bf16: bool = False) -> float:
    model.eval()
    correct = torch.zeros((), device=device)
    with torch.no_grad(), torch.autocast(device, dtype=torch.bfloat16, enabled=bf16):
        for images, labels in batches:
            labels = labels.to(device, non_blocking=True)
            correct += (model(images.to(device, non_blocking=True)).argmax(1) == labels).sum()
    return correct.item()  # one sync per epoch, as a hand-written loop reporting accuracy has


class BareLoop:
    """The reference: normalised float tensors preloaded on the device, a plain loop, nothing else."""

    def __init__(self, args, data_dir: Path, batch_size: int, fused: bool = False, bf16: bool = False):
        torch.manual_seed(0)
        train_split, val_split = split_off_validation(
            load_dataset("fashion_mnist", data_dir).train, val_size(args), SPLIT_SEED
        )
        mean, std = channel_stats(train_split.images)
        normalise = lambda images: ((images.float() / 255 - mean[0]) / std[0]).to(args.device)  # noqa: E731
        self.x, self.y = normalise(train_split.images), train_split.labels.to(args.device)
        self.x_val, self.y_val = normalise(val_split.images), val_split.labels.to(args.device)
        self.model = MLP(depth=2, width=512).build((1, 28, 28), 10).to(args.device)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=1e-3, fused=fused)
        self.batch_size, self.device, self.bf16 = batch_size, args.device, bf16

    def epoch(self) -> float:
        sync(self.device)
        started = time.perf_counter()
        # Shuffled once per epoch, then contiguous batches: one gather an epoch, as a lean hand-written loop has.
        order = torch.randperm(len(self.y), device=self.device)
        x, y, bs = self.x[order], self.y[order], self.batch_size
        train_epoch(
            self.model,
            self.optimizer,
            ((x[i : i + bs], y[i : i + bs]) for i in range(0, len(y), bs)),
            self.device,
            self.bf16,
        )
        evaluate_epoch(
            self.model,
            ((self.x_val[i : i + bs], self.y_val[i : i + bs]) for i in range(0, len(self.y_val), bs)),
            self.device,
            self.bf16,
        )
        sync(self.device)
        return time.perf_counter() - started


class AlternateWithBareLoop(Callback):
    """Runs one bare-loop epoch before each mlplab epoch; times mlplab's epochs start to start, the bare ones aside.

    Adjacent epochs see the same state of a noisy machine, so their ratio is far steadier than separate runs'.
    """

    def __init__(self, bare_loops: dict[str, BareLoop], device: str):
        self.bare_loops, self.device = bare_loops, device
        self.seconds: dict[str, list[float]] = {name: [] for name in [*bare_loops, "mlplab"]}
        self._mlplab_started: float | None = None

    def _end_mlplab_epoch(self) -> None:
        sync(self.device)
        if self._mlplab_started is not None:
            self.seconds["mlplab"].append(time.perf_counter() - self._mlplab_started)

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._end_mlplab_epoch()
        for name, bare in self.bare_loops.items():
            self.seconds[name].append(bare.epoch())
        self._mlplab_started = time.perf_counter()

    def on_train_end(self, trainer, pl_module) -> None:
        self._end_mlplab_epoch()


def time_bare_and_mlplab(
    args, data_dir: Path, workdir: Path, batch_size: int, timed_epochs: int
) -> dict[str, list[float]]:
    """mlplab-train's own path (composed config, data module, Lightning module, Trainer, TensorBoard, checkpoints),
    its epochs alternating with the bare loop's. The first pair warms up and is dropped."""
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(
            "train", overrides=[*run_overrides(args, data_dir, batch_size), f"trainer.max_epochs={timed_epochs + 1}"]
        )
    config = parse_run_config(OmegaConf.to_container(cfg, resolve=True))
    run_dir = Path(tempfile.mkdtemp(prefix="mlplab-run-", dir=workdir))
    bare_loops = {
        name: BareLoop(args, data_dir, batch_size, fused=name != "bare loop", bf16=name == BF16)
        for name in args.bare_loops
    }
    alternate = AlternateWithBareLoop(bare_loops, args.device)
    with contextlib.redirect_stdout(io.StringIO()):  # the test table Lightning prints
        train(config, run_dir, build_logger(cfg.logger, run_dir), [alternate, *build_callbacks(cfg.callbacks)])
    return {name: seconds[1:] for name, seconds in alternate.seconds.items()}


def time_classic(args, data_dir: Path, batch_size: int) -> float:
    """For context: per-sample ToTensor and Normalize through a DataLoader, as most tutorials train."""
    torch.manual_seed(0)
    train_split, _ = split_off_validation(load_dataset("fashion_mnist", data_dir).train, val_size(args), SPLIT_SEED)
    mean, std = channel_stats(train_split.images)
    full = FashionMNIST(
        str(data_dir),
        train=True,
        transform=transforms.Compose([transforms.ToTensor(), transforms.Normalize(mean, std)]),
    )
    order = torch.randperm(len(full), generator=torch.Generator().manual_seed(SPLIT_SEED)).tolist()
    val_indices, train_indices = order[: val_size(args)], order[val_size(args) :]
    train_loader = DataLoader(Subset(full, train_indices), batch_size=batch_size, shuffle=True)
    val_loader = DataLoader(Subset(full, val_indices), batch_size=batch_size)
    model = MLP(depth=2, width=512).build((1, 28, 28), 10).to(args.device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    sync(args.device)
    started = time.perf_counter()
    train_epoch(model, optimizer, train_loader, args.device)
    evaluate_epoch(model, val_loader, args.device)
    sync(args.device)
    return time.perf_counter() - started


# --- start-up, sweeps, memory: the real command line in subprocesses -------------------------------------------------


def cli(args_list: list[str], cwd: Path, probe: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(HERE), os.environ.get("PYTHONPATH")]))}
    if probe is not None:
        args_list = [
            *args_list,
            "+callbacks.first_step._target_=startup_probe.FirstStepProbe",
            f"+callbacks.first_step.path={probe}",
        ]
    return subprocess.run([str(BIN / "mlplab-train"), *args_list], cwd=cwd, env=env, capture_output=True, text=True)


def measure_import_seconds() -> float:
    """Launch of `python -c "import torch, lightning"` to the end of its imports (its exit, slow with torch, is not
    counted)."""
    started = time.time()
    result = subprocess.run(
        [sys.executable, "-c", "import torch, lightning, os, time; print(time.time()); os._exit(0)"],
        check=True,
        capture_output=True,
        text=True,
    )
    return float(result.stdout) - started


def bench_startup(args, data_dir: Path, workdir: Path) -> dict:
    """Launch of mlplab-train to its first optimizer step, next to `import torch, lightning`, interleaved."""
    overrides = run_overrides(args, data_dir, 128)
    if not args.quick:  # --quick checks the script runs, and judges no timing: no launch to warm the cache
        cli([*overrides, "trainer.limit_train_batches=1", "trainer.max_epochs=1"], workdir)  # the dataset cache
    imports, startups = [], []
    for repeat in range(args.repeats if args.quick else args.repeats + 2):  # 5 launches each by default
        imports.append(measure_import_seconds())
        probe = workdir / f"first-step-{repeat}.txt"
        started = time.time()
        result = cli(overrides, workdir, probe)
        if not probe.is_file():
            raise RuntimeError(f"mlplab-train did not reach a first step: {result.stderr[-2000:]}")
        startups.append(float(probe.read_text()) - started)
    answers = time_answers(args, workdir)
    import_s, startup_s = statistics.median(imports), statistics.median(startups)
    print(
        f"\nStart-up: mlplab-train to first optimizer step {startup_s:.2f} s "
        f"(spread {min(startups):.2f}..{max(startups):.2f}); "
        f"python -c 'import torch, lightning' {import_s:.2f} s; difference {startup_s - import_s:.2f} s "
        f"(median of {len(startups)}, interleaved)"
    )
    return {
        "first_step_seconds": startup_s,
        "import_seconds": import_s,
        "difference_seconds": startup_s - import_s,
        "first_step_samples": startups,
        "import_samples": imports,
        "answers": answers,
    }


def time_answers(args, workdir: Path) -> dict:
    """Whole commands that train nothing (help, a refusal, a dry run, a report), next to the imports they would
    otherwise wait for, interleaved; medians of wall seconds, each a fresh process."""
    sweep_dir = workdir / "report-sweep"  # a finished sweep of four jobs, as mlplab-report reads one
    listing = []
    for seed in range(1, 5):
        job = sweep_dir / f"seed={seed}"
        job.mkdir(parents=True, exist_ok=True)
        metrics = {"status": "completed", "val/acc": 0.85 + seed / 100, "test/acc": 0.85, "epochs": 2, "best_epoch": 2}
        (job / "metrics.json").write_text(json.dumps(metrics))
        listing.append({"overrides": [f"seed={seed}"], "dir": job.name})
    (sweep_dir / "jobs.json").write_text(json.dumps(listing))
    commands = {
        "python -c 'import torch'": [sys.executable, "-c", "import torch"],
        "python -c 'import lightning'": [sys.executable, "-c", "import lightning"],
        "mlplab-train --help": [str(BIN / "mlplab-train"), "--help"],
        "mlplab-train model.width=abc (refused)": [str(BIN / "mlplab-train"), "model.width=abc"],
        "mlplab-train -m seed=1..8 dry_run=true": [
            str(BIN / "mlplab-train"),
            "-m",
            "seed=1,2,3,4,5,6,7,8",
            "dry_run=true",
            "sweep=dry",
        ],
        "mlplab-report <sweep of 4 jobs>": [str(BIN / "mlplab-report"), str(sweep_dir)],
    }
    seconds: dict[str, list[float]] = {name: [] for name in commands}
    for _ in range(args.repeats if args.quick else args.repeats + 2):
        for name, command in commands.items():
            started = time.perf_counter()
            subprocess.run(command, cwd=workdir, capture_output=True, check=False)
            seconds[name].append(time.perf_counter() - started)
    medians = {name: statistics.median(values) for name, values in seconds.items()}
    print("\nAnswers without training (whole commands, median wall seconds, interleaved):")
    for name, median in medians.items():
        print(f"  {name:<45} {median:6.2f} s   ({', '.join(f'{v:.2f}' for v in seconds[name])})")
    return {"median_seconds": medians, "samples": seconds}


def bench_sweep(args, data_dir: Path, workdir: Path) -> dict:
    """A 6-job multirun (3 with --quick) of one epoch on 10% of the data: wall time beyond one process's imports and
    exit and the
    jobs' epochs, per job; each repeat next to a `python -c "import torch, lightning"` run (imports and exit)."""
    overheads, walls, process_seconds, epoch_seconds = [], [], [], []
    for repeat in range(args.repeats):
        started = time.time()
        subprocess.run([sys.executable, "-c", "import torch, lightning"], check=True, capture_output=True)
        process_seconds.append(time.time() - started)
        sweep_dir = workdir / f"sweep-{repeat}"
        started = time.time()
        seeds = "seed=1,2,3" if args.quick else "seed=1,2,3,4,5,6"
        result = cli(
            [
                "-m",
                *run_overrides(args, data_dir, 128),
                seeds,
                "trainer.max_epochs=1",
                "trainer.limit_train_batches=0.1",
                f"hydra.sweep.dir={sweep_dir}",
            ],
            workdir,
        )
        walls.append(time.time() - started)
        if result.returncode != 0:
            raise RuntimeError(f"the sweep failed: {result.stderr[-2000:]}")
        jobs = [json.loads(p.read_text()) for p in sorted(sweep_dir.glob("*/metrics.json"))]
        epoch_seconds.append(sum(sum(job["epoch_seconds"]) for job in jobs))
        overheads.append((walls[-1] - process_seconds[-1] - epoch_seconds[-1]) / len(jobs))
    per_job = statistics.median(overheads)
    print(
        f"\nSweep of {len(jobs)} jobs (1 epoch on 10% of the data each), median of {args.repeats}: "
        f"{statistics.median(walls):.2f} s in all, {statistics.median(epoch_seconds):.2f} s in epochs, "
        f"{statistics.median(process_seconds):.2f} s for one process's imports and exit; "
        f"overhead per job {per_job:.2f} s (spread {min(overheads):.2f}..{max(overheads):.2f})"
    )
    return {
        "jobs": len(jobs),
        "wall_seconds": walls,
        "epoch_seconds": epoch_seconds,
        "import_and_exit_seconds": process_seconds,
        "overhead_per_job_seconds": per_job,
        "overhead_per_job_repeats": overheads,
    }


def bench_memory(args, data_dir: Path, workdir: Path) -> dict:
    """Peak resident memory of a default run (one epoch: the peak does not grow with epochs)."""
    code = (
        "import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True, capture_output=True); "
        "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)"
    )
    overrides = run_overrides(args, data_dir, 128)
    result = subprocess.run(
        [sys.executable, "-c", code, str(BIN / "mlplab-train"), *overrides, "trainer.max_epochs=1"],
        cwd=workdir,
        capture_output=True,
        text=True,
        check=True,
    )
    peak_mb = int(result.stdout.split()[-1]) / 1024  # ru_maxrss is in KiB on Linux
    print(f"\nPeak resident memory of a default run (1 epoch): {peak_mb:.0f} MB")
    return {"peak_rss_mb": peak_mb}


def machine(device: str) -> dict:
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    flags = {
        flag
        for line in Path("/proc/cpuinfo").read_text().splitlines()
        if line.startswith("flags")
        for flag in line.split(":", 1)[1].split()
    }
    info = {
        "cpu": cpu,
        "cpu_flags": sorted(flags & {"avx2", "avx512f", *CPU_BF16_FLAGS, "amx_tile"}),
        "native_bf16": fast_bf16(device == "cuda"),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "packages": {
            name: version(name)
            for name in ("torch", "torchvision", "lightning", "torchmetrics", "hydra-core", "tensorboard")
        },
    }
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
    return info


if __name__ == "__main__":
    main()
