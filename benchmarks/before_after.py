#!/usr/bin/env python
"""An earlier mlplab against this one, side by side: epoch time, start-up and sweep overhead.

    python benchmarks/before_after.py --before c1e7508            # 3 rounds, about 10 minutes on 2 cores

Each round runs ``benchmarks/speed.py`` of the earlier commit (its own code, from a git worktree, in a small venv
that borrows this one's packages) and then this checkout's, one after the other, so both see the machine in the
same state. Each speed.py run times mlplab's epochs alternating with a bare PyTorch loop's in one process, so the
epoch figure compared is mlplab's time relative to the bare loop of the same run; start-up is the time to the
first optimizer step minus ``import torch, lightning`` measured next to it; sweep overhead is per job, beyond the
jobs' epochs. Medians over the rounds; the JSON goes to benchmarks/results/.
"""

from __future__ import annotations

import argparse
import json
import site
import statistics
import subprocess
import sys
import tempfile
from datetime import datetime
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
SPEED_ARGS = [
    "--parts",
    "epoch",
    "startup",
    "sweep",
    "--batch-sizes",
    "128",
    "--repeats",
    "1",
    "--timed-epochs",
    "2",
    "--no-classic",
]
# The figure compared per part: (label, how to read it from speed.py's JSON, unit)
FIGURES = {
    "epoch": (
        "mlplab epoch / bare loop epoch (batch 128)",
        lambda r: next(row["ratio_to_bare"] for row in r["epoch"]["table"] if row["contender"] == "mlplab"),
        "ratio",
    ),
    "startup": ("start-up beyond importing torch and lightning", lambda r: r["startup"]["difference_seconds"], "s"),
    "sweep": ("sweep overhead per job", lambda r: r["sweep"]["overhead_per_job_seconds"], "s"),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", required=True, help="the earlier commit (any git revision)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--output", type=Path, default=HERE / "results")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="mlplab-before-after-"))
    try:
        compare(args, work)
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", str(work / "before")], cwd=ROOT, capture_output=True)


def compare(args: argparse.Namespace, work: Path) -> None:
    before_python = prepare_before(args.before, work)
    commands = {
        "before": [str(before_python), str(work / "before" / "benchmarks" / "speed.py")],
        "after": [sys.executable, str(HERE / "speed.py")],
    }
    results: dict[str, list[dict]] = {"before": [], "after": []}
    for round_number in range(args.rounds):
        for version, command in commands.items():
            out = work / f"{version}-{round_number}"
            subprocess.run([*command, *SPEED_ARGS, "--output", str(out)], check=True, cwd=work, capture_output=True)
            (path,) = out.glob("speed-*.json")
            results[version].append(json.loads(path.read_text()))
            print(
                f"round {round_number + 1}/{args.rounds} {version}: "
                + ", ".join(f"{part} {read(results[version][-1]):.3f}" for part, (_, read, _) in FIGURES.items()),
                flush=True,
            )
    table = []
    for part, (label, read, unit) in FIGURES.items():
        values = {version: [read(result) for result in runs] for version, runs in results.items()}
        medians = {version: statistics.median(v) for version, v in values.items()}
        table.append(
            {
                "part": part,
                "figure": label,
                "unit": unit,
                **{f"{v}_median": m for v, m in medians.items()},
                **{f"{v}_values": values[v] for v in values},
            }
        )
    after_rev = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
    ).stdout.strip()
    print(f"\n| figure | before ({args.before}) | after ({after_rev}) | spread before | spread after |")
    print("|---|---:|---:|---|---|")
    for row in table:
        spread = {v: f"{min(row[f'{v}_values']):.3f}..{max(row[f'{v}_values']):.3f}" for v in ("before", "after")}
        print(
            f"| {row['figure']} ({row['unit']}) | {row['before_median']:.3f} | {row['after_median']:.3f} | "
            f"{spread['before']} | {spread['after']} |"
        )
    args.output.mkdir(parents=True, exist_ok=True)
    path = args.output / f"before-after-{datetime.now():%Y-%m-%dT%H%M}.json"
    path.write_text(
        json.dumps(
            {
                "before": args.before,
                "after": after_rev,
                "rounds": args.rounds,
                "table": table,
                "machine": results["after"][0]["machine"],
                "speed_args": SPEED_ARGS,
            },
            indent=2,
        )
        + "\n"
    )
    print(f"\nwritten: {path}")


def prepare_before(revision: str, work: Path) -> Path:
    """The earlier commit's tree, and a venv whose console script runs it with this venv's packages."""
    tree = work / "before"
    subprocess.run(
        ["git", "worktree", "add", "--detach", str(tree), revision], cwd=ROOT, check=True, capture_output=True
    )
    venv = work / "venv-before"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    (purelib,) = [p for p in (venv / "lib").glob("python*/site-packages")]
    # The earlier source first, then this venv's packages (their .pth files, this checkout's among them, are not read).
    (purelib / "mlplab-before.pth").write_text(f"{tree / 'src'}\n{site.getsitepackages()[0]}\n")
    script = venv / "bin" / "mlplab-train"
    script.write_text(f"#!{venv / 'bin' / 'python'}\nfrom mlplab.train import main\nmain()\n")
    script.chmod(0o755)
    return venv / "bin" / "python"


if __name__ == "__main__":
    main()
