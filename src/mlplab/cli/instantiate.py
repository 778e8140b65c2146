"""The objects a run's config names by class path, which Hydra instantiates: its logger(s) and callbacks."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from mlplab.errors import one_line
from mlplab.run.checkpoints import checkpoint_step
from mlplab.run.config import ConfigError
from mlplab.run.trackers import mlflow_arguments
from mlplab.run.wandb_tracker import wandb_arguments


def build_logger(
    logger_cfg: DictConfig | None,
    run_dir: Path,
    resume_from: Path | None = None,
    experiment: str | None = None,
    trial: int | None = None,
) -> Any:
    """The configured logger, or several (a group of ``name: logger config``), writing into ``run_dir``.

    Resuming, TensorBoard and the CSV file leave out what the stopped run logged after its checkpoint
    (``purge_step``), so the curves continue without doubled or rewound points; MLflow and W&B continue the run's
    own run. ``experiment``: the sweep's name for a sweep job (MLflow's experiment, W&B's group); ``trial``: a
    search trial's number (in W&B's config).
    """
    if not logger_cfg:
        return False
    if "_target_" not in logger_cfg:
        loggers = [build_logger(cfg, run_dir, resume_from, experiment, trial) for cfg in logger_cfg.values() if cfg]
        return loggers or False
    arguments: dict[str, Any] = {"save_dir": str(run_dir)}
    target = logger_cfg.get("_target_", "")
    try:
        if resume_from and target.endswith(("TensorBoardLogger", "ResumableCSVLogger")):
            arguments["purge_step"] = checkpoint_step(resume_from) + 1
        if target.endswith("MLFlowLogger"):
            arguments |= mlflow_arguments(OmegaConf.to_container(logger_cfg, resolve=True), run_dir, experiment)
        if target.endswith("RunWandbLogger"):
            settings = OmegaConf.to_container(logger_cfg, resolve=True)
            arguments |= wandb_arguments(settings, run_dir, resume_from, experiment, trial)
        return instantiate(logger_cfg, **arguments)
    except InstantiationException as error:
        raise ConfigError(f"logger: {one_line(error)}") from None


def build_callbacks(callbacks_cfg: DictConfig | None) -> list[Any]:
    callbacks = []
    for name, callback_cfg in (callbacks_cfg or {}).items():
        if callback_cfg is None:  # callbacks.<name>=null switches one off
            continue
        try:
            callbacks.append(instantiate(callback_cfg))
        except InstantiationException as error:
            raise ConfigError(f"callbacks.{name}: {one_line(error)}") from None
    return callbacks
