"""The optimizer and the learning-rate schedule: any ``torch.optim`` class by its path (``_target_``) with its own
keyword arguments, as ``optimizer=...`` and ``scheduler=...`` give them.

Both are kept as plain values (a class path and its arguments), so checkpoints load with ``weights_only=True``.
"""

from __future__ import annotations

import importlib
import inspect
import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.optim.lr_scheduler import LRScheduler, ReduceLROnPlateau

from mlplab.earlier_versions import upgraded_optimizer, upgraded_schedule
from mlplab.errors import SettingError, closest

# fused: one kernel updates every parameter (CPU and CUDA); the default loops over parameters in Python, which on
# the CPU costs 0.6 ms per step against 0.2 ms for the default network. Same update up to rounding.
FUSED_BY_DEFAULT = (torch.optim.Adam, torch.optim.AdamW, torch.optim.SGD)
INTERVALS = ("epoch", "step")


def _class_at(path: Any, base: type, kind: str = "", example: str = "") -> type:
    """The class a dotted path names, which must derive from ``base``; ValueError otherwise."""
    wanted = f"_target_ must be the path of {kind} class (e.g. {example})"
    module_name, _, name = str(path).rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), name) if module_name else None
    except (ImportError, AttributeError, ValueError):
        cls = None
    if not (isinstance(cls, type) and issubclass(cls, base)):
        raise SettingError("_target_", f"{wanted}; got {path!r}")
    return cls


def _check_arguments(cls: type, path: str, arguments: dict[str, Any], skipped: tuple[str, ...]) -> None:
    """Refuse keyword arguments ``cls`` does not take, naming the closest it does."""
    taken = [
        name
        for name, p in inspect.signature(cls.__init__).parameters.items()
        if name not in ("self", *skipped) and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
    ]
    for key, value in arguments.items():
        if key not in taken:
            raise SettingError(key, f"{key}: not an argument of {path}; {closest(key, taken)}")
        if isinstance(value, float) and not math.isfinite(value):
            raise SettingError(key, f"{key} must be a finite number, got {value}")


def _built(cls: type[torch.optim.Optimizer], parameters: Any, arguments: dict[str, Any]) -> torch.optim.Optimizer:
    fused = {"fused": True} if cls in FUSED_BY_DEFAULT and "fused" not in arguments else {}
    return cls(parameters, **arguments, **fused)


def _example_parameters() -> list[torch.nn.Parameter]:
    parameter = torch.nn.Parameter(torch.zeros(2))
    parameter.grad = torch.ones(2)
    return [parameter]


@dataclass(frozen=True)
class OptimizerSettings:
    """``optimizer=...``: a ``torch.optim.Optimizer`` class path and its keyword arguments."""

    target: str = "torch.optim.Adam"
    arguments: dict[str, Any] = field(default_factory=lambda: {"lr": 1e-3, "weight_decay": 0.0})  # as optimizer=adam

    def __post_init__(self) -> None:
        cls = _class_at(self.target, torch.optim.Optimizer, "a torch.optim optimizer", "torch.optim.RMSprop")
        _check_arguments(cls, self.target, self.arguments, skipped=("params",))
        lr = self.arguments.get("lr", 1.0)
        if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not lr > 0:
            raise SettingError("lr", f"lr must be a number > 0, got {lr!r}")
        if problem := self._refusal(self.arguments):
            # Which argument: the first the class refuses on its own.
            key = next((key for key in self.arguments if self._refusal({key: self.arguments[key]})), None)
            where = (
                f"{key}: {self.target} refuses {self.arguments[key]!r}"
                if key
                else f"{self.target} refuses these arguments"
            )
            raise SettingError(key, f"{where} ({problem})")

    def _refusal(self, arguments: dict[str, Any]) -> str | None:
        """The class's own objection to ``arguments`` (a negative rate, a wrong type, an overflow in its update)
        on one step of an example parameter, or None; found now rather than after the data has loaded."""
        try:
            _built(self.cls, _example_parameters(), arguments).step()
        except (ValueError, TypeError, RuntimeError) as error:
            return str(error).splitlines()[0]
        return None

    @property
    def cls(self) -> type[torch.optim.Optimizer]:
        return _class_at(self.target, torch.optim.Optimizer)

    @property
    def state_per_parameter(self) -> int:
        """Values the optimizer keeps per parameter (Adam's two moments, SGD's momentum buffer), for the memory
        estimate: counted after one step on an example parameter."""
        parameters = _example_parameters()
        optimizer = self.build(parameters)
        optimizer.step()
        return sum(
            1
            for value in optimizer.state[parameters[0]].values()
            if torch.is_tensor(value) and value.shape == parameters[0].shape
        )

    def build(self, parameters: Any) -> torch.optim.Optimizer:
        return _built(self.cls, parameters, self.arguments)

    def as_dict(self) -> dict[str, Any]:
        """As the config writes it: ``_target_`` and the arguments."""
        return {"_target_": self.target, **self.arguments}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> OptimizerSettings:
        """The inverse of ``as_dict``; also reads what earlier versions stored."""
        values = upgraded_optimizer(values)
        return cls(values.pop("_target_"), values)


class WarmupCosineLR(LRScheduler):
    """A linear warm-up over the first ``warmup_fraction`` of the steps, then cosine annealing to ``eta_min``."""

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        total_steps: int,
        warmup_fraction: float = 0.05,
        eta_min: float = 0.0,
        last_epoch: int = -1,
    ):
        if not 0 <= warmup_fraction < 1:
            raise ValueError(f"warmup_fraction must satisfy 0 <= f < 1, got {warmup_fraction}")
        self.total_steps, self.eta_min = total_steps, eta_min
        self.warmup_steps = round(warmup_fraction * total_steps)
        super().__init__(optimizer, last_epoch)

    def get_lr(self) -> list[float]:
        step = self.last_epoch
        if step < self.warmup_steps:
            return [base * (step + 1) / self.warmup_steps for base in self.base_lrs]
        progress = min(1.0, (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps))
        return [self.eta_min + (base - self.eta_min) * (1 + math.cos(math.pi * progress)) / 2 for base in self.base_lrs]


@dataclass(frozen=True)
class ScheduleSettings:
    """``scheduler=...``: a ``torch.optim.lr_scheduler`` class path (None: a constant rate), its keyword arguments,
    whether it steps per epoch or per optimizer step, and the metric a ReduceLROnPlateau watches.

    Arguments that follow from the run are filled in when not given: ``T_max`` and ``total_steps`` (the epochs or
    steps of the run, by ``interval``) and ``max_lr`` (the optimizer's ``lr``).
    """

    target: str | None = None
    arguments: dict[str, Any] = field(default_factory=dict)
    interval: str = "epoch"
    monitor: str = "val/loss"

    def __post_init__(self) -> None:
        if self.target is None:
            if self.arguments:
                raise SettingError(
                    "_target_",
                    f"_target_ is null (a constant rate), which takes no arguments; got {', '.join(self.arguments)}",
                )
            return
        cls = _class_at(self.target, LRScheduler, "a torch.optim.lr_scheduler", "torch.optim.lr_scheduler.StepLR")
        _check_arguments(cls, self.target, self.arguments, skipped=("optimizer",))
        if self.interval not in INTERVALS:
            raise SettingError("interval", f"interval must be one of {', '.join(INTERVALS)}; got {self.interval!r}")

    def check_with(self, optimizer: OptimizerSettings) -> None:
        """Build and step the schedule on an example optimizer; ValueError with the class's reason if it fails."""
        try:
            example = optimizer.cls(_example_parameters(), **optimizer.arguments)
            config = self.build(example, epochs=10, steps=100)
            for _ in range(10 if config else 0):  # a few steps: some classes use an argument only at a decay
                example.step()
                config["scheduler"].step(*([1.0] if "monitor" in config else []))
        except (ValueError, TypeError, KeyError) as error:
            raise SettingError(
                None, f"{self.target} refuses these arguments with {optimizer.target}: {error}"
            ) from None

    def build(self, optimizer: torch.optim.Optimizer, epochs: int, steps: int) -> dict[str, Any] | None:
        """Lightning's scheduler config for a run of ``epochs`` epochs and ``steps`` optimizer steps, or None."""
        if self.target is None:
            return None
        cls = _class_at(self.target, LRScheduler)
        computed = {
            "T_max": epochs if self.interval == "epoch" else steps,
            "total_steps": steps if self.interval == "step" else epochs,
            "max_lr": [group["lr"] for group in optimizer.param_groups],
        }
        taken = inspect.signature(cls.__init__).parameters
        arguments = {key: value for key, value in computed.items() if key in taken} | self.arguments
        config = {"scheduler": cls(optimizer, **arguments), "interval": self.interval}
        if issubclass(cls, ReduceLROnPlateau):
            config["monitor"] = self.monitor
        return config

    def as_dict(self) -> dict[str, Any]:
        if self.target is None:
            return {"_target_": None}
        plateau = issubclass(_class_at(self.target, LRScheduler), ReduceLROnPlateau)
        return {
            "_target_": self.target,
            **self.arguments,
            "interval": self.interval,
            **({"monitor": self.monitor} if plateau else {}),
        }

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> ScheduleSettings:
        """The inverse of ``as_dict``; also reads what earlier versions stored."""
        values = upgraded_schedule(values)
        options = {key: values.pop(key) for key in ("interval", "monitor") if key in values}
        return cls(values.pop("_target_", None), values, **options)
