"""The typed boundary between Hydra's config and the code: every value is checked here, before any work."""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException
import torch

from mlplab.datasets import DATASETS
from mlplab.module import OPTIMIZERS, SCHEDULERS
from mlplab.network import ACTIVATIONS, OUTPUT_ACTIVATIONS

# An installed console script has no sensible working directory to look in: the configs live beside the package.
CONFIG_DIR = str(Path(__file__).resolve().parents[2] / "conf")
ACCELERATORS = ("auto", "cpu", "gpu")
STRATEGIES = ("auto", "ddp")
PRECISIONS = ("32-true", "16-mixed", "bf16-mixed", "16-true", "bf16-true", "64-true", 16, 32, 64)


class ConfigError(ValueError):
    """A config value that is not allowed; the message names the key and what is allowed."""


def require_accelerator(accelerator: str, key: str, alternative: str) -> None:
    """Refuse ``gpu`` on a machine where CUDA sees none, before any data is loaded."""
    _require(accelerator != "gpu" or torch.cuda.is_available(),
             f"{key}=gpu, but this machine has no usable CUDA GPU; {alternative}")


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


@dataclass(frozen=True)
class ModelConfig:
    depth: int
    width: int | list[int]
    activation: str = "relu"
    dropout: float = 0.0
    output_activation: str = "none"

    def __post_init__(self) -> None:
        _require(self.depth >= 0, f"model.depth must be an integer >= 0, got {self.depth}")
        widths = [self.width] if isinstance(self.width, int) else self.width
        _require(all(w >= 1 for w in widths), f"model.width must be >= 1 (an integer or a list of them), got {self.width}")
        _require(
            isinstance(self.width, int) or len(self.width) == self.depth,
            f"model.width lists {len(widths)} layer sizes but model.depth is {self.depth}; give one per hidden layer",
        )
        _require(self.activation in ACTIVATIONS, f"model.activation must be one of {', '.join(ACTIVATIONS)}; got {self.activation!r}")
        _require(0 <= self.dropout < 1, f"model.dropout must satisfy 0 <= p < 1, got {self.dropout}")
        _require(
            self.output_activation in OUTPUT_ACTIVATIONS,
            f"model.output_activation must be one of {', '.join(OUTPUT_ACTIVATIONS)}; got {self.output_activation!r}",
        )


@dataclass(frozen=True)
class DataConfig:
    name: str
    batch_size: int = 128
    eval_batch_size: int = 1000
    val_size: int = 5000
    split_seed: int = 0
    system_dir: str | None = None
    download: bool = True

    def __post_init__(self) -> None:
        _require(self.name in DATASETS, f"data.name must be one of {', '.join(DATASETS)}; got {self.name!r}")
        _require(self.batch_size >= 1, f"data.batch_size must be an integer >= 1, got {self.batch_size}")
        _require(self.eval_batch_size >= 1, f"data.eval_batch_size must be an integer >= 1, got {self.eval_batch_size}")
        _require(self.val_size >= 1, f"data.val_size must be an integer >= 1, got {self.val_size}")


@dataclass(frozen=True)
class OptimizerConfig:
    name: str
    lr: float
    weight_decay: float = 0.0
    momentum: float = 0.0

    def __post_init__(self) -> None:
        _require(self.name in OPTIMIZERS, f"optimizer.name must be one of {', '.join(OPTIMIZERS)}; got {self.name!r}")
        _require(self.lr > 0, f"optimizer.lr must be a number > 0, got {self.lr}")
        _require(self.weight_decay >= 0, f"optimizer.weight_decay must be a number >= 0, got {self.weight_decay}")
        _require(0 <= self.momentum < 1, f"optimizer.momentum must satisfy 0 <= m < 1, got {self.momentum}")
        _require(self.momentum == 0 or self.name == "sgd", "optimizer.momentum applies only to optimizer=sgd")


@dataclass(frozen=True)
class SchedulerConfig:
    name: str = "none"
    min_lr: float = 0.0

    def __post_init__(self) -> None:
        _require(self.name in SCHEDULERS, f"scheduler.name must be one of {', '.join(SCHEDULERS)}; got {self.name!r}")
        _require(self.min_lr >= 0, f"scheduler.min_lr must be a number >= 0, got {self.min_lr}")


@dataclass(frozen=True)
class TrainerConfig:
    accelerator: str = "auto"
    strategy: str = "auto"
    devices: int | str = "auto"
    precision: str | int = "32-true"
    max_epochs: int = 10
    deterministic: bool = False
    log_every_n_steps: int = 50
    limit_train_batches: int | float = 1.0
    limit_val_batches: int | float = 1.0
    limit_test_batches: int | float = 1.0
    gradient_clip_val: float | None = None
    num_sanity_val_steps: int = 0

    def __post_init__(self) -> None:
        _require(self.accelerator in ACCELERATORS, f"trainer.accelerator must be one of {', '.join(ACCELERATORS)}; got {self.accelerator!r}")
        _require(self.strategy in STRATEGIES, f"trainer.strategy must be one of {', '.join(STRATEGIES)}; got {self.strategy!r}")
        _require(
            self.devices == "auto" or (isinstance(self.devices, int) and self.devices >= 1),
            f"trainer.devices must be an integer >= 1 or 'auto', got {self.devices!r}",
        )
        _require(self.precision in PRECISIONS, f"trainer.precision must be one of {', '.join(map(str, PRECISIONS))}; got {self.precision!r}")
        _require(self.max_epochs >= 1, f"trainer.max_epochs must be an integer >= 1, got {self.max_epochs}")
        _require(self.log_every_n_steps >= 1, f"trainer.log_every_n_steps must be an integer >= 1, got {self.log_every_n_steps}")
        for key in ("limit_train_batches", "limit_val_batches", "limit_test_batches"):
            value = getattr(self, key)
            _require(
                value > 0 and (isinstance(value, int) or value <= 1),
                f"trainer.{key} must be a fraction in (0, 1] or a number of batches >= 1, got {value}",
            )
        _require(
            self.gradient_clip_val is None or self.gradient_clip_val > 0,
            f"trainer.gradient_clip_val must be null or a number > 0, got {self.gradient_clip_val}",
        )
        _require(self.num_sanity_val_steps >= -1, f"trainer.num_sanity_val_steps must be an integer >= -1, got {self.num_sanity_val_steps}")


@dataclass(frozen=True)
class CheckpointConfig:
    every_n_steps: int = 500

    def __post_init__(self) -> None:
        _require(self.every_n_steps >= 0, f"checkpoint.every_n_steps must be an integer >= 0 (0: only at epoch ends), got {self.every_n_steps}")


@dataclass(frozen=True)
class RunConfig:
    seed: int
    data_dir: str
    model: ModelConfig
    data: DataConfig
    optimizer: OptimizerConfig
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)


@dataclass(frozen=True)
class _PathsConfig:
    data_dir: str = "data"


# Groups handled elsewhere: logger and callbacks are third-party objects built by the entry point.
OPEN_GROUPS = ("logger", "callbacks")
# Keys that steer the command (name or list a sweep, resume a run) rather than describe the run.
CONTROL_KEYS = ("sweep", "dry_run", "resume", "trial", "hparams_search")
SECTIONS = {"model": ModelConfig, "data": DataConfig, "optimizer": OptimizerConfig,
            "scheduler": SchedulerConfig, "trainer": TrainerConfig, "checkpoint": CheckpointConfig}


def parse_run_config(raw: dict[str, Any]) -> RunConfig:
    """Check a resolved config (plain dict) key by key and return it typed; raises ConfigError."""
    allowed = {"seed", "paths", *SECTIONS, *OPEN_GROUPS, *CONTROL_KEYS}
    for key in raw:
        _require(key in allowed, f"{key}: unknown top-level key; allowed: {', '.join(sorted(allowed))}")
    seed = raw.get("seed")
    _require(_matches(seed, int) and seed >= 0, f"seed must be an integer >= 0, got {seed!r}")
    paths = parse_section("paths", _PathsConfig, raw.get("paths") or {})
    sections = {name: parse_section(name, cls, raw.get(name) or {}) for name, cls in SECTIONS.items()}
    return RunConfig(seed=seed, data_dir=paths.data_dir, **sections)


def parse_section(name: str, cls: type, values: dict[str, Any]) -> Any:
    """Build dataclass ``cls`` from one config group, refusing unknown keys and wrong types."""
    _require(isinstance(values, dict), f"{name} must be a group of keys, got {values!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key, value in values.items():
        _require(key in fields, f"{name}.{key}: unknown key; allowed: {', '.join(fields)}")
        _require(_matches(value, hints[key]), f"{name}.{key} must be {_describe(hints[key])}, got {value!r}")
    for key, f in fields.items():
        no_default = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        _require(key in values or not no_default, f"{name}.{key} is required ({_describe(hints[key])})")
    converted = {k: float(v) if hints[k] is float else v for k, v in values.items()}
    return cls(**converted)


def _matches(value: Any, expected: Any) -> bool:
    if typing.get_origin(expected) in (typing.Union, types.UnionType):
        return any(_matches(value, option) for option in typing.get_args(expected))
    if typing.get_origin(expected) is list:
        (item,) = typing.get_args(expected)
        return isinstance(value, list) and all(_matches(v, item) for v in value)
    if expected is type(None):
        return value is None
    if isinstance(value, bool):
        return expected is bool
    if expected is float:
        return isinstance(value, (int, float))
    return isinstance(value, expected)


def _describe(expected: Any) -> str:
    if typing.get_origin(expected) in (typing.Union, types.UnionType):
        return " or ".join(_describe(option) for option in typing.get_args(expected))
    if typing.get_origin(expected) is list:
        return f"a list of {_PLURALS.get(typing.get_args(expected)[0], 'values')}"
    return _NAMES.get(expected, str(expected))


_NAMES = {int: "an integer", float: "a number", str: "a string", bool: "true or false", type(None): "null"}
_PLURALS = {int: "integers", float: "numbers", str: "strings"}


def describe_config_error(error: Exception) -> str:
    """One line for what OmegaConf or Hydra refused while composing or resolving: the key, then what is wrong."""
    cause = error if isinstance(error, OmegaConfBaseException) else error.__cause__
    if not (isinstance(cause, OmegaConfBaseException) and cause.full_key):
        return "; ".join(line.strip() for line in str(error).splitlines() if line.strip())
    key, reason = cause.full_key, str(cause.msg).splitlines()[0]
    if "is not in struct" not in reason:
        return f"{key}: {reason}"
    section, _, name = key.partition(".")
    fields = [f.name for f in dataclasses.fields(SECTIONS[section])] if section in SECTIONS and "." not in name else []
    if name in fields:  # e.g. optimizer.momentum with optimizer=adam
        having = sorted(p.stem for p in (Path(CONFIG_DIR) / section).glob("*.yaml") if name in (OmegaConf.load(p) or {}))
        return f"{key}: not a setting of the chosen {section}; {section} options that have it: {', '.join(having)}"
    if fields:
        return f"{key}: unknown key; allowed: {', '.join(fields)}"
    return f"{key}: unknown key; mlplab-train --cfg job lists the keys (+{key}=... adds one where that makes sense)"
