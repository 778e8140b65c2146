"""mlplab-report <sweep dir>: regenerate a sweep's summary (also mid-sweep) and print its table."""

from __future__ import annotations

import sys
from pathlib import Path

from mlplab.sweeps.job_records import SWEEP_JOBS_FILE
from mlplab.sweeps.summary import write_summary


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1 or args[0].startswith("-"):
        print("usage: mlplab-report <sweep dir>   (a folder under outputs/sweeps/)", file=sys.stderr)
        sys.exit(2)
    sweep_dir = Path(args[0])
    if not sweep_dir.is_dir() or not (any(sweep_dir.glob("*/.hydra")) or (sweep_dir / SWEEP_JOBS_FILE).is_file()):
        problem = "does not exist" if not sweep_dir.exists() else "is not a sweep folder (no jobs in it)"
        print(
            f"mlplab-report: error: {sweep_dir} {problem}; give a sweep folder made by mlplab-train -m",
            file=sys.stderr,
        )
        sys.exit(2)
    _, text = write_summary(sweep_dir)
    print(text, end="")
    written = ", ".join(str(sweep_dir / name) for name in ("summary.csv", "summary.md", "summary.png", "pareto.png"))
    print(f"\nWritten: {written}")


if __name__ == "__main__":
    main()
