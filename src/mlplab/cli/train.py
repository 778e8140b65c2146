"""mlplab-train: Hydra composes the config; it is checked once, then one run (or, under -m, one sweep job, or a
data-parallel rank) trains through ``mlplab.run.train.train``.

    main -> hydra_main -> run_request.train_task (every run, sweep job and rank) -> RunRequest -> train
"""

from __future__ import annotations

from typing import Any

import hydra
from omegaconf import DictConfig

from mlplab.cli import run_request
from mlplab.cli.compose import CONFIG_DIR
from mlplab.cli.failure import console_main
from mlplab.cli.resume import check_resume


def main() -> None:
    """Console script: every problem the user can fix ends as one line and an exit status (exit_for)."""
    console_main(run_request.TOOL, hydra_main, check_resume, lambda: run_request.task_started)


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train")
def hydra_main(cfg: DictConfig) -> dict[str, Any]:
    return run_request.train_task(cfg)


if __name__ == "__main__":
    main()
