#!/usr/bin/env python
"""Seed sweeps of the default network through mlplab-train, stacked (hydra/launcher=stacked) against job by job
(Hydra's basic launcher), on real Fashion-MNIST: wall time, jobs per minute and epochs per second.

    python benchmarks/stacked_sweep.py --ks 8 --epochs 2 --repeats 3            # the CPU target: 8 seeds
    python benchmarks/stacked_sweep.py --device cuda --ks 1 4 8 16 32 --epochs 2 --alone-ks 1 4 8
    python benchmarks/stacked_sweep.py --quick                                  # synthetic data: checks the script
    python benchmarks/stacked_sweep.py --search 4 --ks 2 --epochs 2 --repeats 2   # a search: 4 trials of 2 seeds
    python benchmarks/stacked_sweep.py --depths 1 2 --widths 64 128 256 512 --ks 2 --epochs 2 --repeats 2  # shapes
    python benchmarks/stacked_sweep.py --depths 1 2 --widths 64 128 256 512 --ks 2 --epochs 2 --repeats 2 --bare

Each sweep is a fresh mlplab-train process (imports and exit counted: that is what a user waits for), seeds
1..K, default settings otherwise. Repeats are interleaved (stacked, then job by job, for each K in turn); the
table gives medians. With ``--search N``, each sweep is instead an Optuna search of N trials over the learning rate
(hydra.sweeper.seeds_per_trial=K, ``--trials-at-once`` trials asked together, no pruning, the same TPE seed both
ways, so both run the same trials); the table adds trials per hour. ``--alone-ks`` limits the job-by-job sweeps to
those K (on a GPU, 32 jobs one by one take long and say little: each job costs the same). With ``--depths`` and
``--widths``, each sweep is a shape sweep: every depth and width, each with seeds 1..K. With ``--bare``, the same
networks also train in the simplest loop that trains them together (benchmarks/bare_stack.py, a process of its own,
interleaved with the sweeps): the floor a stacked sweep could reach, with none of mlplab's records.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

HERE = Path(__file__).resolve().parent
BIN = Path(sys.executable).parent
SYSTEM_DIR = Path(os.environ.get("FASHION_MNIST_DIR", "/usr/share/datasets/fashion-mnist"))


def sweep(k: int, stacked: bool, args: argparse.Namespace, workdir: Path, data_dir: Path, number: int) -> dict:
    """One sweep of seeds 1..k; its wall time and its jobs' test accuracies."""
    sweep_dir = workdir / f"sweep-{number}-k{k}-{'stacked' if stacked else 'alone'}"
    seeds = [f"seed={','.join(map(str, range(1, k + 1)))}" if k > 1 else "seed=1"]
    if args.depths or args.widths:
        seeds += [f"model.depth={','.join(map(str, args.depths or [2]))}"]
        seeds += [f"model.width={','.join(map(str, args.widths or [512]))}"]
    if args.search:
        seeds = [
            "hydra/sweeper=optuna",
            f"hydra.sweeper.n_trials={args.search}",
            f"hydra.sweeper.seeds_per_trial={k}",
            f"hydra.sweeper.n_jobs={args.trials_at_once}",
            "hydra.sweeper.pruner=null",
            "+hydra.sweeper.sampler.constant_liar=true",
            "optimizer.lr=tag(log, interval(0.0003, 0.003))",
        ]
    command = [
        str(BIN / "mlplab-train"),
        "-m",
        *seeds,
        f"trainer={'gpu' if args.device == 'cuda' else 'cpu'}",
        f"trainer.max_epochs={args.epochs}",
        f"paths.data_dir={data_dir}",
        "callbacks.progress_bar=null",
        f"hydra.sweep.dir={sweep_dir}",
        *(["hydra/launcher=stacked"] if stacked else []),
        *args.overrides,
    ]
    if args.quick:
        command += ["data.system_dir=null", "data.download=false", "data.val_size=100", "model.width=16"]
    elif SYSTEM_DIR.is_dir():
        command.append(f"data.system_dir={SYSTEM_DIR}")
    started = time.perf_counter()
    result = subprocess.run(command, cwd=workdir, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed: {result.stderr[-3000:]}")
    metrics = [json.loads(path.read_text()) for path in sorted(sweep_dir.glob("*/metrics.json"))]
    return {"wall_s": wall, "test_acc": [job["test/acc"] for job in metrics]}


def bare(k: int, args: argparse.Namespace, data_dir: Path) -> dict:
    """benchmarks/bare_stack.py on the same networks and data: its wall time and its networks' test accuracies."""
    command = [sys.executable, str(HERE / "bare_stack.py"), "--data-dir", str(data_dir / "FashionMNIST" / "raw")]
    command += ["--depths", *map(str, args.depths or [2]), "--widths", *map(str, args.widths or [512])]
    command += ["--seeds", *map(str, range(1, k + 1)), "--epochs", str(args.epochs)]
    started = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, check=True)
    return {"wall_s": time.perf_counter() - started, **json.loads(result.stdout.splitlines()[-1])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--ks", type=int, nargs="+", default=[1, 4, 8, 16, 32])
    parser.add_argument("--alone-ks", type=int, nargs="*", help="K for which job-by-job sweeps run (default: all)")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--search", type=int, help="search this many trials of K seeds each instead of a seed sweep")
    parser.add_argument("--trials-at-once", type=int, default=2, help="with --search: trials asked together")
    parser.add_argument("--depths", type=int, nargs="+", help="a shape sweep: these model.depth values")
    parser.add_argument("--widths", type=int, nargs="+", help="a shape sweep: these model.width values")
    parser.add_argument("--bare", action="store_true", help="also time the simplest loop (benchmarks/bare_stack.py)")
    parser.add_argument("--quick", action="store_true", help="synthetic data, tiny network: checks the script runs")
    parser.add_argument("--output", type=Path, default=HERE / "results", help="folder for the JSON result")
    parser.add_argument("overrides", nargs="*", help="further mlplab-train overrides for every sweep")
    args = parser.parse_args()
    alone_ks = args.ks if args.alone_ks is None else args.alone_ks
    shapes = len(args.depths or [2]) * len(args.widths or [512]) if args.depths or args.widths else 1
    runs: dict[tuple[int, bool], list[dict]] = {}
    with tempfile.TemporaryDirectory() as temporary:
        workdir = Path(temporary)
        data_dir = workdir / "data"
        if args.quick:
            from mlplab.data.synthetic import write_mnist_like

            write_mnist_like(data_dir / "FashionMNIST" / "raw")
        number = 0
        for _ in range(args.repeats):
            for k in args.ks:
                for stacked in (True, False):
                    if stacked or k in alone_ks:
                        number += 1
                        runs.setdefault((k, stacked), []).append(sweep(k, stacked, args, workdir, data_dir, number))
                if args.bare and not args.search:
                    runs.setdefault((k, "bare"), []).append(bare(k, args, data_dir))
    rows = []
    print(
        f"{'K':>3} {'stacked s':>10} {'job by job s':>13} {'ratio':>6} {'jobs/min stacked':>17} "
        f"{'jobs/min alone':>15} {'epochs/s stacked':>17} {'test/acc stacked':>17} {'test/acc alone':>15}"
    )
    for k in args.ks:
        row: dict = {"k": k}
        for stacked, name in ((True, "stacked"), (False, "alone")):
            if (k, stacked) not in runs:
                continue
            walls = [run["wall_s"] for run in runs[(k, stacked)]]
            wall = statistics.median(walls)
            accuracies = runs[(k, stacked)][-1]["test_acc"]
            row[name] = {
                "wall_s": wall,
                "walls_s": walls,
                "jobs": k * shapes * (args.search or 1),
                "jobs_per_minute": 60 * k * shapes * (args.search or 1) / wall,
                **({"trials_per_hour": 3600 * args.search / wall} if args.search else {}),
                "epochs_per_second": k * shapes * (args.search or 1) * args.epochs / wall,
                "test_acc": accuracies,
                "test_acc_mean": statistics.mean(accuracies),
            }
        if "alone" in row:
            row["ratio"] = row["stacked"]["wall_s"] / row["alone"]["wall_s"]
            row["mean_abs_test_acc_difference"] = statistics.mean(
                abs(a - b) for a, b in zip(row["stacked"]["test_acc"], row["alone"]["test_acc"])
            )
        if (k, "bare") in runs:
            walls = [run["wall_s"] for run in runs[(k, "bare")]]
            row["bare"] = {**runs[(k, "bare")][-1], "wall_s": statistics.median(walls), "walls_s": walls}
            if "alone" in row:
                row["bare"]["ratio"] = row["bare"]["wall_s"] / row["alone"]["wall_s"]
        rows.append(row)
        alone = row.get("alone", {})
        print(
            f"{k:>3} {row['stacked']['wall_s']:>10.1f} {alone.get('wall_s', float('nan')):>13.1f} "
            f"{row.get('ratio', float('nan')):>6.2f} {row['stacked']['jobs_per_minute']:>17.1f} "
            f"{alone.get('jobs_per_minute', float('nan')):>15.1f} {row['stacked']['epochs_per_second']:>17.2f} "
            f"{row['stacked']['test_acc_mean']:>17.4f} {alone.get('test_acc_mean', float('nan')):>15.4f}"
        )
        if "bare" in row:
            print(
                f"    the simplest loop (benchmarks/bare_stack.py): {row['bare']['wall_s']:.1f} s, "
                f"ratio {row['bare'].get('ratio', float('nan')):.2f} to job by job, of which training "
                f"{row['bare']['train_s']:.1f} s"
            )
        if args.search:
            print(
                f"    a search of {args.search} trials of {k} seeds: {row['stacked']['trials_per_hour']:.1f} "
                f"trials/hour stacked, {alone.get('trials_per_hour', float('nan')):.1f} job by job"
            )
    import torch

    device = (
        torch.cuda.get_device_name()
        if args.device == "cuda"
        else next(
            (
                line.split(":", 1)[1].strip()
                for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")
            ),
            platform.processor(),
        )
    )
    result = {
        "benchmark": "stacked_sweep",
        "date": datetime.now().isoformat(timespec="seconds"),
        "device": device,
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "epochs": args.epochs,
        "repeats": args.repeats,
        "search_trials": args.search,
        "trials_at_once": args.trials_at_once if args.search else None,
        "depths": args.depths,
        "widths": args.widths,
        "cpu_flags": sorted(
            {
                flag
                for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("flags")
                for flag in line.split(":", 1)[1].split()
            }
            & {"avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile"}
        ),
        "quick": args.quick,
        "overrides": args.overrides,
        "rows": rows,
    }
    args.output.mkdir(parents=True, exist_ok=True)
    out = args.output / f"stacked-sweep-{args.device}-{datetime.now():%Y-%m-%dT%H%M}.json"
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"saved {out}")


if __name__ == "__main__":
    main()
