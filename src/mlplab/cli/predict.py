"""mlplab-predict: classify image files, or the run's test set, with a trained run's model."""

from __future__ import annotations

import csv
import glob
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import hydra
import torch
from omegaconf import DictConfig, ListConfig
from torch import Tensor

from mlplab.cli.compose import CONFIG_DIR
from mlplab.cli.evaluate import load_data, load_model
from mlplab.cli.failure import console_main, exit_for
from mlplab.data.images import read_image
from mlplab.errors import MlplabError
from mlplab.run.config import ConfigError
from mlplab.run.lightning_notes import lightning_console_logging
from mlplab.run.records import find_checkpoint

if TYPE_CHECKING:  # Lightning's: imported with the checkpoint (mlplab.cli.evaluate.load_model), not for --help
    from mlplab.model.classifier import ImageClassifier

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")
TEST_CSV = "predictions_test.csv"


def main() -> None:
    """Console script: every problem the user can fix ends as one line and an exit status."""
    console_main("mlplab-predict", hydra_main)


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="predict")
def hydra_main(cfg: DictConfig) -> None:
    lightning_console_logging()  # before Lightning is imported
    try:
        if cfg.format not in ("table", "json"):
            raise ConfigError(f"format must be table or json, got {cfg.format!r}")
        if not isinstance(cfg.top_k, int) or isinstance(cfg.top_k, bool) or cfg.top_k < 1:
            raise ConfigError(f"top_k must be an integer >= 1, got {cfg.top_k!r}")
        run_dir, checkpoint = find_checkpoint(cfg.run, cfg.checkpoint)
        model = load_model(checkpoint)
        if cfg.inputs == "test":
            output = Path(cfg.output) if cfg.output else run_dir / TEST_CSV
            accuracy, count = predict_test_set(model, checkpoint, Path(cfg.paths.data_dir), output)
            print(f"{count} test predictions (accuracy {accuracy:.4f}) written to {output}")
            return
        files = input_files(cfg.inputs)
    except MlplabError as error:
        exit_for("mlplab-predict", error)
    results = predict_files(model, files, min(cfg.top_k, model.hparams.num_classes))
    print(json.dumps(results, indent=2) if cfg.format == "json" else results_table(results))
    unreadable = [result for result in results if "error" in result]
    for result in unreadable:
        print(f"mlplab-predict: {result['path']}: {result['error']}", file=sys.stderr)
    if unreadable:
        sys.exit(1)


def input_files(inputs: Any) -> list[Path]:
    """Image files from a file, a directory (its images, sorted), a glob pattern, or a list of these."""
    items = list(inputs) if isinstance(inputs, (list, ListConfig)) else [inputs]
    files: list[Path] = []
    for item in map(str, items):
        path = Path(item)
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                raise ConfigError(f"inputs: {path} holds no images ({', '.join(IMAGE_SUFFIXES)})")
            files += found
        elif path.exists():
            files.append(path)  # whatever its name: if it is no image, it is reported as unreadable
        elif matches := sorted(glob.glob(item)):
            files += map(Path, matches)
        else:
            raise ConfigError(f"inputs: {item} does not exist; give image files, a directory, a glob or test")
    return files


def class_probabilities(model: ImageClassifier, images: Tensor, batch_size: int = 1000) -> Tensor:
    """Softmax probabilities, N x classes, for uint8 images N x C x H x W."""
    with torch.inference_mode():
        return torch.cat(
            [model(images[start : start + batch_size]).softmax(dim=1) for start in range(0, len(images), batch_size)]
        )


def predict_files(model: ImageClassifier, files: list[Path], top_k: int = 1) -> list[dict[str, Any]]:
    """One result per file, in order: its most probable classes, or why it could not be read."""
    shape, names = tuple(model.hparams.input_shape), list(model.hparams.class_names)
    results: list[dict[str, Any]] = []
    images: list[Tensor] = []
    for path in files:
        try:
            images.append(read_image(path, shape))
            results.append({"path": str(path)})
        except (OSError, ValueError) as error:  # not an image, damaged, too large
            results.append({"path": str(path), "error": f"cannot read it as an image ({' '.join(str(error).split())})"})
    if images:
        probabilities, classes = class_probabilities(model, torch.stack(images)).topk(top_k, dim=1)
        readable = (result for result in results if "error" not in result)
        for result, top_probabilities, top_classes in zip(readable, probabilities.tolist(), classes.tolist()):
            result["class"], result["probability"] = names[top_classes[0]], round(top_probabilities[0], 4)
            if top_k > 1:
                result["top"] = [
                    {"class": names[c], "probability": round(p, 4)} for c, p in zip(top_classes, top_probabilities)
                ]
    return results


def results_table(results: list[dict[str, Any]]) -> str:
    width = max(len("file"), *(len(result["path"]) for result in results))
    lines = [f"{'file':<{width}}  {'class':<12}  probability"]
    for result in results:
        if "error" in result:
            lines.append(f"{result['path']:<{width}}  (unreadable)")
            continue
        line = f"{result['path']:<{width}}  {result['class']:<12}  {result['probability']:.4f}"
        if "top" in result:
            line += "   then " + ", ".join(f"{t['class']} {t['probability']:.4f}" for t in result["top"][1:])
        lines.append(line)
    return "\n".join(lines)


def predict_test_set(model: ImageClassifier, checkpoint: Path, data_dir: Path, output: Path) -> tuple[float, int]:
    """Write a CSV with one row per test image: its label, the prediction, and every class's probability."""
    datamodule = load_data(checkpoint, data_dir)
    datamodule.setup("test")
    test = datamodule.splits["test"]
    probabilities = class_probabilities(model, test.images)
    predictions = probabilities.argmax(dim=1)
    names = list(model.hparams.class_names)
    output.parent.mkdir(parents=True, exist_ok=True)
    with output.open("w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(
            [
                "index",
                "label",
                "label_name",
                "predicted",
                "predicted_name",
                "probability",
                "correct",
                *(f"p_{name}" for name in names),
            ]
        )
        for index, (label, predicted, row) in enumerate(
            zip(test.labels.tolist(), predictions.tolist(), probabilities.tolist())
        ):
            writer.writerow(
                [
                    index,
                    label,
                    names[label],
                    predicted,
                    names[predicted],
                    f"{row[predicted]:.6f}",
                    int(label == predicted),
                    *(f"{p:.6f}" for p in row),
                ]
            )
    return float((predictions == test.labels).double().mean()), len(test)


if __name__ == "__main__":
    main()
