"""Everything that reads what earlier versions of mlplab wrote, in one place: their checkpoints' hyperparameters,
their optimizer and schedule settings, and the overrides and recorded config of their runs (which ``resume=``
repeats).

Each function takes what an earlier version stored and returns it as this version writes it; what this version
wrote passes through unchanged. tests/test_old_runs.py evaluates, predicts and resumes a run of mlplab 0.1.
"""

from __future__ import annotations

import math
from typing import Any

# mlplab 0.1 named the optimizer (``name``); now it is a class path (``_target_``).
OPTIMIZER_NAMES = {"adam": "torch.optim.Adam", "adamw": "torch.optim.AdamW", "sgd": "torch.optim.SGD"}
COSINE = "torch.optim.lr_scheduler.CosineAnnealingLR"
# Keys of earlier versions that are written differently now; resuming one of their runs repeats its overrides.
RENAMED_KEYS = {"optimizer.name": "optimizer", "scheduler.name": "scheduler", "scheduler.min_lr": "scheduler.eta_min"}


def upgraded_override(override: str) -> str:
    """An override of an earlier version's run (``optimizer.name=sgd``) as this version's (``optimizer=sgd``)."""
    key = override.lstrip("+~").split("=", 1)[0]
    return override.replace(key, RENAMED_KEYS[key], 1) if key in RENAMED_KEYS else override


def upgraded_optimizer(values: dict[str, Any]) -> dict[str, Any]:
    """Optimizer settings: ``name`` (and ``momentum``, stored for every optimizer) become ``_target_`` and its
    arguments."""
    values = dict(values)
    if "name" in values:
        name = values.pop("name")
        if name != "sgd":
            values.pop("momentum", None)
        values["_target_"] = OPTIMIZER_NAMES[name]
    return values


def upgraded_schedule(values: dict[str, Any]) -> dict[str, Any]:
    """Schedule settings: ``name`` (none or cosine) and ``min_lr`` become ``_target_`` and ``eta_min``."""
    if "name" not in values:
        return dict(values)
    if values["name"] == "none":
        return {}
    return {"_target_": COSINE, "eta_min": values.get("min_lr", 0.0)}


def upgraded_section(name: str, values: Any) -> Any:
    """A top-level key of a run's recorded config (``.hydra/config.yaml``: ``optimizer``, ``model``, ``seed``...)
    as this version writes it."""
    upgrade = {"optimizer": upgraded_optimizer, "scheduler": upgraded_schedule}.get(name)
    return upgrade(values) if upgrade and isinstance(values, dict) else values


def upgraded_hparams(hparams: dict[str, Any]) -> dict[str, Any]:
    """A checkpoint's hyperparameters as ImageClassifier takes them now.

    mlplab 0.1 wrote the MLP's, optimizer's and schedule's settings flat, and the input as a feature count.
    """
    if "backbone" in hparams:
        return dict(hparams)
    channels = len(hparams["input_mean"])
    side = math.isqrt(hparams["num_features"] // channels)  # every dataset 0.1 knew has square images
    return {
        "backbone": {
            "family": "mlp",
            **{key: hparams[key] for key in ("depth", "width", "activation", "dropout", "output_activation")},
        },
        "input_shape": [channels, side, side],
        "num_classes": hparams["num_classes"],
        "optimizer": {
            "name": hparams["optimizer"],
            "lr": hparams["lr"],
            "weight_decay": hparams["weight_decay"],
            "momentum": hparams["momentum"],
        },
        "scheduler": {"name": hparams["scheduler"], "min_lr": hparams["min_lr"]},
        **{key: hparams[key] for key in ("max_epochs", "input_mean", "input_std", "class_names")},
    }
