"""mlplab-eval: test a finished run again, from its own checkpoint."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import hydra
import lightning as L
from omegaconf import DictConfig

from mlplab.cli.compose import CONFIG_DIR
from mlplab.cli.failure import exit_for
from mlplab.data.datamodule import ImageDataModule
from mlplab.errors import MlplabError
from mlplab.model.classifier import ImageClassifier
from mlplab.run.checkpoints import read_checkpoint
from mlplab.run.config import ConfigError
from mlplab.run.records import find_checkpoint, read_metrics
from mlplab.run.trainer import ACCELERATORS, require_accelerator


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="eval")
def main(cfg: DictConfig) -> dict[str, Any]:
    try:
        if cfg.checkpoint not in ("best", "last"):
            raise ConfigError(f"checkpoint must be best or last, got {cfg.checkpoint!r}")
        if cfg.accelerator not in ACCELERATORS:
            raise ConfigError(f"accelerator must be one of {', '.join(ACCELERATORS)}; got {cfg.accelerator!r}")
        if cfg.format not in ("table", "json"):
            raise ConfigError(f"format must be table or json, got {cfg.format!r}")
        run_dir, checkpoint = find_checkpoint(cfg.run, cfg.checkpoint)
        results = evaluate(checkpoint, Path(cfg.paths.data_dir), cfg.accelerator)
    except MlplabError as error:
        exit_for("mlplab-eval", error)
    recorded = read_metrics(run_dir)
    report = {
        "run": str(run_dir),
        "checkpoint": str(checkpoint),
        **results,
        **{f"recorded {key}": recorded[key] for key in results if key in recorded},
    }
    print(json.dumps(report, indent=2) if cfg.format == "json" else _table(report))
    return report


def evaluate(checkpoint: Path, data_dir: Path, accelerator: str = "auto") -> dict[str, float]:
    """Test metrics of a checkpoint on its dataset's official test split, with the data set-up it trained with."""
    require_accelerator(accelerator, "accelerator", "use accelerator=cpu or accelerator=auto")
    model, datamodule = load_model(checkpoint), load_data(checkpoint, data_dir)
    trainer = L.Trainer(
        accelerator=accelerator,
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    (results,) = trainer.test(model, datamodule=datamodule, verbose=False)
    return {key: float(value) for key, value in results.items()}


def load_model(checkpoint: Path) -> ImageClassifier:
    """The trained model of a checkpoint, in evaluation mode, on the CPU; refuses a damaged or unsafe file."""
    return ImageClassifier.from_checkpoint(read_checkpoint(checkpoint))


def load_data(checkpoint: Path, data_dir: Path) -> ImageDataModule:
    """The data module a checkpoint trained with, its files provided; only the data's location is this machine's."""
    datamodule = ImageDataModule.from_checkpoint(read_checkpoint(checkpoint), data_dir)
    datamodule.prepare_data()
    return datamodule


def _table(report: dict[str, Any]) -> str:
    width = max(map(len, report))
    return "\n".join(
        f"{key:<{width}}  {value:.4f}" if isinstance(value, float) else f"{key:<{width}}  {value}"
        for key, value in report.items()
    )


if __name__ == "__main__":
    main()
