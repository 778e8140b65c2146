"""mlplab-train: Hydra composes the config; it is checked once, then one run (or, under -m, one sweep job, or a
data-parallel rank) trains through ``mlplab.run.train.train``.

    main -> hydra_main -> run_request.train_task (every run, sweep job and rank) -> RunRequest -> train

What a run needs (torch, Lightning, torchvision) is imported where the run starts (run_request's functions), once
Hydra has composed a config and mlplab has checked it: --help and refusals answer without it.
"""

from __future__ import annotations

import sys
from typing import Any

import hydra
from omegaconf import DictConfig

from mlplab.cli.command_line import TRAIN
from mlplab.cli.compose import CONFIG_DIR
from mlplab.cli.failure import console_main
from mlplab.cli.resume import check_resume


def main() -> None:
    """Console script: every problem the user can fix ends as one line and an exit status (exit_for)."""
    console_main(TRAIN, hydra_main, check_resume, task_started)


def task_started() -> bool:
    """Whether Hydra got as far as the task function (which imported run_request)."""
    run_request = sys.modules.get("mlplab.cli.run_request")
    return bool(run_request and run_request.task_started)


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train")
def hydra_main(cfg: DictConfig) -> dict[str, Any]:
    from mlplab.cli import run_request

    return run_request.train_task(cfg)


if __name__ == "__main__":
    main()
