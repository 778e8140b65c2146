"""What the TensorBoard views beyond scalars (src/mlplab/run/views/) cost: the time spent in each callback's hooks
during a default run of 3 epochs with every view on (weight histograms every epoch), next to the epoch time.

    python benchmarks/inspection_cost.py [--epochs 3] [--data-dir data]
"""

from __future__ import annotations

import argparse
import collections
import functools
import statistics
import tempfile
import time
from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from mlplab.cli.compose import CONFIG_DIR
from mlplab.cli.instantiate import build_callbacks, build_logger
from mlplab.run.config import parse_run_config
from mlplab.run.train import train
from mlplab.run.views import network, predictions

HOOKS = (
    "on_fit_start",
    "on_train_epoch_start",
    "on_before_optimizer_step",
    "on_train_epoch_end",
    "on_validation_end",
    "on_test_end",
)
VIEWS = (
    predictions.ConfusionMatrix,
    predictions.PerClassAccuracy,
    predictions.MisclassifiedImages,
    network.WeightHistograms,
    network.ModelDescription,
    network.LearningRate,
)


def timed_hooks(spent: dict[str, float]) -> None:
    """Wrap each view's hooks so that their time adds up in ``spent`` (per class and hook)."""
    for view in VIEWS:
        for hook in HOOKS:
            if hook in view.__dict__:
                setattr(view, hook, _timed(view.__dict__[hook], f"{view.__name__}.{hook}", spent))


def _timed(method, key: str, spent: dict[str, float]):
    @functools.wraps(method)
    def wrapper(*args, **kwargs):
        started = time.perf_counter()
        try:
            return method(*args, **kwargs)
        finally:
            spent[key] += time.perf_counter() - started

    return wrapper


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--data-dir", default="data")
    args = parser.parse_args()
    spent: dict[str, float] = collections.defaultdict(float)
    timed_hooks(spent)
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(
            "train",
            overrides=[
                "trainer=cpu",
                f"trainer.max_epochs={args.epochs}",
                "callbacks.progress_bar=null",
                "callbacks.weight_histograms.every_n_epochs=1",
                f"paths.data_dir={args.data_dir}",
            ],
        )
    config = parse_run_config(OmegaConf.to_container(cfg, resolve=True))
    with tempfile.TemporaryDirectory() as run_dir:
        metrics = train(config, Path(run_dir), build_logger(cfg.logger, Path(run_dir)), build_callbacks(cfg.callbacks))
    epoch = statistics.median(metrics["epoch_seconds"])
    print(f"\nmedian epoch {epoch:.2f} s over {args.epochs} epochs")
    for key, seconds in sorted(spent.items()):
        per = "run" if key.endswith(("on_fit_start", "on_test_end")) else "epoch"
        share = f"  ({seconds / args.epochs / epoch:.1%} of an epoch)" if per == "epoch" else ""
        print(f"{key:45s} {seconds / (1 if per == 'run' else args.epochs) * 1000:7.1f} ms per {per}{share}")


if __name__ == "__main__":
    main()
