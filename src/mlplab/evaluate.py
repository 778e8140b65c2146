"""mlplab-eval: test a finished run again, from its own checkpoint."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig

import lightning as L

from mlplab.checkpoints import read_checkpoint
from mlplab.config import ACCELERATORS, CONFIG_DIR, ConfigError, require_accelerator
from mlplab.data import ImageDataModule
from mlplab.datasets import DataUnavailableError
from mlplab.module import MLPClassifier
from mlplab.runs import find_checkpoint, read_metrics


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
    except (ConfigError, DataUnavailableError, FileNotFoundError) as error:
        print(f"mlplab-eval: error: {error}", file=sys.stderr)
        sys.exit(2)
    recorded = read_metrics(run_dir)
    report = {"run": str(run_dir), "checkpoint": str(checkpoint), **results,
              **{f"recorded {key}": recorded[key] for key in results if key in recorded}}
    print(json.dumps(report, indent=2) if cfg.format == "json" else _table(report))
    return report


def evaluate(checkpoint: Path, data_dir: Path, accelerator: str = "auto") -> dict[str, float]:
    """Test metrics of a checkpoint on its dataset's official test split, with the data set-up it trained with."""
    require_accelerator(accelerator, "accelerator", "use accelerator=cpu or accelerator=auto")
    model, datamodule = load_model(checkpoint), load_data(checkpoint, data_dir)
    trainer = L.Trainer(accelerator=accelerator, devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    (results,) = trainer.test(model, datamodule=datamodule, verbose=False)
    return {key: float(value) for key, value in results.items()}


def load_model(checkpoint: Path) -> MLPClassifier:
    """The trained model of a checkpoint, in evaluation mode, on the CPU."""
    read_checkpoint(checkpoint)  # refuses a damaged or unsafe file before anything else reads it
    return MLPClassifier.load_from_checkpoint(checkpoint, map_location="cpu", weights_only=True).eval()


def load_data(checkpoint: Path, data_dir: Path) -> ImageDataModule:
    """The data module a checkpoint trained with, its files provided; only the data's location is this machine's."""
    datamodule = ImageDataModule.load_from_checkpoint(checkpoint, data_dir=str(data_dir), weights_only=True)
    datamodule.prepare_data()
    return datamodule


def _table(report: dict[str, Any]) -> str:
    width = max(map(len, report))
    return "\n".join(f"{key:<{width}}  {value:.4f}" if isinstance(value, float) else f"{key:<{width}}  {value}"
                     for key, value in report.items())


if __name__ == "__main__":
    main()
