"""mlplab-eval: test a finished run again, from its own checkpoint."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import hydra
from omegaconf import DictConfig

from mlplab.cli.compose import CONFIG_DIR
from mlplab.cli.failure import console_main, exit_for
from mlplab.errors import MlplabError
from mlplab.run.config import ConfigError
from mlplab.run.lightning_notes import ignore_lightning_warnings, lightning_console_logging, quiet_lightning
from mlplab.run.records import find_checkpoint, read_metrics, read_yaml_record
from mlplab.run.settings import ACCELERATORS, require_accelerator

if TYPE_CHECKING:  # imported where a checkpoint is loaded: Lightning, torchmetrics and torchvision (not for --help)
    from mlplab.data.datamodule import ImageDataModule
    from mlplab.model.classifier import ImageClassifier


def main() -> None:
    """Console script: every problem the user can fix ends as one line and an exit status."""
    console_main("mlplab-eval", hydra_main)


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="eval")
def hydra_main(cfg: DictConfig) -> dict[str, Any]:
    lightning_console_logging()  # before Lightning is imported
    try:
        if cfg.checkpoint not in ("best", "last"):
            raise ConfigError(f"checkpoint must be best or last, got {cfg.checkpoint!r}")
        if cfg.accelerator not in ACCELERATORS:
            raise ConfigError(f"accelerator must be one of {', '.join(ACCELERATORS)}; got {cfg.accelerator!r}")
        if cfg.format not in ("table", "json"):
            raise ConfigError(f"format must be table or json, got {cfg.format!r}")
        run_dir, checkpoint = find_checkpoint(cfg.run, cfg.checkpoint)
        # The run's records first: a damaged one is refused before minutes of testing.
        recorded, limit = read_metrics(run_dir), _test_limit(run_dir)
        results = evaluate(checkpoint, Path(cfg.paths.data_dir), cfg.accelerator)
    except MlplabError as error:
        exit_for("mlplab-eval", error)
    report = {
        "run": str(run_dir),
        "checkpoint": str(checkpoint),
        **results,
        **{f"recorded {key}": recorded[key] for key in results if key in recorded},
    }
    if limit is not None and any(key.startswith("recorded") for key in report):
        report["note"] = (
            f"the run tested on part of the test set (trainer.limit_test_batches={limit}); this evaluation tests on "
            "all of it, so its numbers differ from the recorded ones"
        )
    print(json.dumps(report, indent=2) if cfg.format == "json" else _table(report))
    return report


def evaluate(checkpoint: Path, data_dir: Path, accelerator: str = "auto") -> dict[str, float]:
    """Test metrics of a checkpoint on its dataset's official test split, with the data set-up it trained with."""
    import lightning as L

    require_accelerator(accelerator, "accelerator", "use accelerator=cpu or accelerator=auto")
    model, datamodule = load_model(checkpoint), load_data(checkpoint, data_dir)
    ignore_lightning_warnings()
    with quiet_lightning():
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
    from mlplab.model.classifier import ImageClassifier
    from mlplab.run.checkpoints import read_checkpoint

    return ImageClassifier.from_checkpoint(read_checkpoint(checkpoint))


def load_data(checkpoint: Path, data_dir: Path) -> ImageDataModule:
    """The data module a checkpoint trained with, its files provided; only the data's location is this machine's."""
    from mlplab.data.datamodule import ImageDataModule
    from mlplab.run.checkpoints import read_checkpoint

    datamodule = ImageDataModule.from_checkpoint(read_checkpoint(checkpoint), data_dir)
    datamodule.prepare_data()
    return datamodule


def _test_limit(run_dir: Path) -> Any:
    """The run's trainer.limit_test_batches, when it tested on part of the test set; else None."""
    config = run_dir / ".hydra" / "config.yaml"
    trainer = read_yaml_record(config, dict).get("trainer") if config.is_file() else None
    limit = trainer.get("limit_test_batches") if isinstance(trainer, dict) else None
    whole = limit is None or (isinstance(limit, float) and limit == 1.0)  # 1.0 is all of it; 1 is one batch
    return None if whole else limit


def _table(report: dict[str, Any]) -> str:
    width = max(map(len, report))
    return "\n".join(
        f"{key:<{width}}  {value:.4f}" if isinstance(value, float) else f"{key:<{width}}  {value}"
        for key, value in report.items()
    )


if __name__ == "__main__":
    main()
