"""mlplab-train: the Hydra entry point. Below ``main`` everything takes typed values."""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException, InstantiationException
from hydra.utils import instantiate
import lightning as L
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.callbacks import ModelCheckpoint, ModelSummary, ProgressBar
from lightning.pytorch.plugins.io import AsyncCheckpointIO
from omegaconf import DictConfig, OmegaConf

from mlplab.config import ConfigError, RunConfig, TrainerConfig, parse_run_config, require_accelerator
from mlplab.data import ImageDataModule
from mlplab.datasets import DataUnavailableError
from mlplab.history import EpochHistory
from mlplab.module import MLPClassifier
from mlplab.network import count_parameters
from mlplab.runs import write_metrics

# An installed console script has no sensible working directory to look in: the configs live beside the package.
CONFIG_DIR = str(Path(__file__).resolve().parents[2] / "conf")

log = logging.getLogger(__name__)



def job_dirname(overrides: str) -> str:
    """A sweep job's directory name from its overrides: one path component (no "/"), at most 150 characters."""
    name = overrides.replace("/", "_") or "defaults"
    if len(name) > 150:  # file names end at 255 bytes; the hash keeps long ones apart
        name = f"{name[:140]}~{hashlib.sha1(overrides.encode()).hexdigest()[:8]}"
    return name


# Same-second runs get distinct directories: the timestamp alone is not unique.
OmegaConf.register_new_resolver("mlplab.pid", lambda: os.getpid(), replace=True)
OmegaConf.register_new_resolver("mlplab.job_dirname", job_dirname, replace=True)


def main() -> None:
    """Console script: a mistyped group option costs one line, then Hydra takes over."""
    problem = unknown_group_option(sys.argv[1:], Path(CONFIG_DIR))
    if problem:
        print(f"mlplab-train: error: {problem}", file=sys.stderr)
        sys.exit(2)
    hydra_main()


def unknown_group_option(args: list[str], config_dir: Path) -> str | None:
    """The first ``group=option`` in ``args`` whose option has no YAML file, described with the options allowed."""
    try:
        overrides = OverridesParser.create().parse_overrides([a for a in args if not a.startswith("-")])
    except HydraException:
        return None  # Hydra reports syntax errors itself
    for override in overrides:
        group_dir = config_dir / override.key_or_group
        if override.is_delete() or override.key_or_group == "hydra" or not group_dir.is_dir():
            continue
        try:
            values = list(override.sweep_string_iterator()) if override.is_sweep_override() else [override.get_value_element_as_str()]
        except HydraException:
            continue  # glob() and friends are expanded by Hydra later
        allowed = sorted(p.stem for p in group_dir.glob("*.yaml"))
        for value in values:
            if value not in allowed:
                return f"{override.key_or_group}={value}: no such option; allowed: {', '.join(allowed)}"
    return None


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train")
def hydra_main(cfg: DictConfig) -> dict[str, Any]:
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    # Lightning 2.6's own use of a torch API deprecated in torch 2.10; nothing a user can act on.
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")
    try:
        config = parse_run_config(OmegaConf.to_container(cfg, resolve=True))
        logger, callbacks = build_logger(cfg.logger, run_dir), build_callbacks(cfg.callbacks)
        return train(config, run_dir, logger, callbacks)
    except (ConfigError, DataUnavailableError) as error:
        print(f"mlplab-train: error: {error}", file=sys.stderr)
        _discard_if_unused(run_dir)
        sys.exit(2)


def _discard_if_unused(run_dir: Path) -> None:
    """Remove the directory Hydra made for a run that never started, so typos leave no clutter."""
    if all(entry.name == ".hydra" or entry.suffix == ".log" for entry in run_dir.iterdir()):
        shutil.rmtree(run_dir, ignore_errors=True)


def build_logger(logger_cfg: DictConfig | None, run_dir: Path) -> Any:
    if not logger_cfg:
        return False
    try:
        return instantiate(logger_cfg, save_dir=str(run_dir))
    except InstantiationException as error:
        raise ConfigError(f"logger: {_one_line(error)}") from None


def build_callbacks(callbacks_cfg: DictConfig | None) -> list[Any]:
    callbacks = []
    for name, callback_cfg in (callbacks_cfg or {}).items():
        if callback_cfg is None:  # callbacks.<name>=null switches one off
            continue
        try:
            callbacks.append(instantiate(callback_cfg))
        except InstantiationException as error:
            raise ConfigError(f"callbacks.{name}: {_one_line(error)}") from None
    return callbacks


def _one_line(error: Exception) -> str:
    return " ".join(str(error.__cause__ or error).split())


def build_trainer(config: TrainerConfig, run_dir: Path, logger: Any, callbacks: list[Any]) -> L.Trainer:
    """A Lightning Trainer writing into ``run_dir``; refuses an accelerator this machine lacks."""
    require_accelerator(config.accelerator, "trainer.accelerator", "use trainer=cpu or trainer=auto")

    def has(kind: type) -> bool:
        return any(isinstance(callback, kind) for callback in callbacks)

    try:
        return L.Trainer(
            **vars(config),
            default_root_dir=run_dir,
            logger=logger,
            callbacks=callbacks,
            # Checkpoints are copied in memory and written by a background thread: on a busy disk a write can
            # stall for seconds, longer than an epoch. Lightning waits for the writes when fit ends.
            plugins=[AsyncCheckpointIO()],
            # Lightning adds its own of each unless told not to; the callbacks group decides instead.
            enable_checkpointing=has(ModelCheckpoint),
            enable_progress_bar=has(ProgressBar),
            enable_model_summary=has(ModelSummary),
        )
    except MisconfigurationException as error:
        raise ConfigError(f"trainer: {_one_line(error)}") from None


def build_model(config: RunConfig, datamodule: ImageDataModule) -> MLPClassifier:
    model, optimizer = config.model, config.optimizer
    return MLPClassifier(
        num_features=datamodule.num_features,
        num_classes=datamodule.num_classes,
        depth=model.depth,
        width=model.width,
        activation=model.activation,
        dropout=model.dropout,
        output_activation=model.output_activation,
        optimizer=optimizer.name,
        lr=optimizer.lr,
        weight_decay=optimizer.weight_decay,
        momentum=optimizer.momentum,
        scheduler=config.scheduler.name,
        min_lr=config.scheduler.min_lr,
        max_epochs=config.trainer.max_epochs,
        input_mean=datamodule.mean,
        input_std=datamodule.std,
        class_names=datamodule.class_names,
    )


def train(config: RunConfig, run_dir: Path, logger: Any = False, callbacks: list[Any] | None = None) -> dict[str, Any]:
    """Train, then test the best checkpoint; writes and returns metrics.json's content."""
    started = time.perf_counter()
    run_dir.mkdir(parents=True, exist_ok=True)
    L.seed_everything(config.seed, workers=True, verbose=False)
    history = EpochHistory()
    trainer = build_trainer(config.trainer, run_dir, logger, [*(callbacks or []), history])
    datamodule = ImageDataModule(
        name=config.data.name,
        data_dir=config.data_dir,
        batch_size=config.data.batch_size,
        eval_batch_size=config.data.eval_batch_size,
        val_size=config.data.val_size,
        split_seed=config.data.split_seed,
        shuffle_seed=config.seed,
        system_dir=config.data.system_dir,
        download=config.data.download,
    )
    if trainer.is_global_zero:
        datamodule.prepare_data()
    datamodule.setup("fit")
    model = build_model(config, datamodule)
    log.info("Run directory: %s", run_dir)

    metrics: dict[str, Any] = {"status": "running", "num_parameters": count_parameters(model.network)}
    # Lightning sets this at import so device checks cannot initialise CUDA before a fork. With it set, torch's
    # Adam queries NVML at every step (dlopen + init, ~0.3 ms). Nothing forks from here on.
    os.environ.pop("PYTORCH_NVML_BASED_CUDA_CHECK", None)
    try:
        trainer.fit(model, datamodule=datamodule)
        metrics.update(history.best())
        tested = trainer.test(model, datamodule=datamodule, ckpt_path="best" if trainer.checkpoint_callback else None)
        metrics.update({key: value for key, value in tested[0].items() if key.startswith("test/")})
        metrics["status"] = "completed"
    except BaseException as error:
        metrics["status"] = "interrupted" if isinstance(error, (KeyboardInterrupt, SystemExit)) else "failed"
        metrics["error"] = f"{type(error).__name__}: {_one_line(error)}"
        raise
    finally:
        metrics["epochs"] = len(history.epochs)
        metrics["epoch_seconds"] = history.epoch_seconds
        metrics["wall_seconds"] = round(time.perf_counter() - started, 3)
        if trainer.checkpoint_callback and trainer.checkpoint_callback.best_model_path:
            metrics["best_checkpoint"] = os.path.relpath(trainer.checkpoint_callback.best_model_path, run_dir)
        if trainer.is_global_zero:
            write_metrics(run_dir, metrics)
    _report(run_dir, metrics)
    return metrics


def _report(run_dir: Path, metrics: dict[str, Any]) -> None:
    log.info(
        "Finished: test/acc %.4f, best val/acc %.4f at epoch %d, %.1f s",
        metrics.get("test/acc", float("nan")), metrics.get("val/acc", float("nan")),
        metrics.get("best_epoch", -1), metrics["wall_seconds"],
    )
    log.info("Run directory: %s", run_dir)
    log.info("TensorBoard:   tensorboard --logdir %s", run_dir)


if __name__ == "__main__":
    main()
