"""The settings of the ``trainer`` and ``checkpoint`` groups, typed and checked. Importable without Lightning or
torch (commands that only check settings answer without their imports); a check that needs one imports it then.
Their use: mlplab.run.trainer (the Trainer) and mlplab.run.checkpoints (resume points)."""

from __future__ import annotations

import inspect
import re
from dataclasses import dataclass, field
from typing import Any

from mlplab.errors import MlplabError, SettingError, closest

ACCELERATORS = ("auto", "cpu", "gpu")
STRATEGIES = ("auto", "ddp")
PRECISIONS = ("auto", "32-true", "16-mixed", "bf16-mixed", "16-true", "bf16-true", "64-true", 16, 32, 64)


class TrainerError(MlplabError):
    """The trainer cannot run as configured on this machine."""


# Trainer arguments mlplab sets itself, and where a user changes what they decide.
MANAGED_ARGUMENTS = {
    "logger": "mlplab sets it from the logger group (logger=tensorboard|csv|mlflow|none)",
    "callbacks": "mlplab sets it from the callbacks group (+callbacks.<name>._target_=... adds one)",
    "default_root_dir": "it is the run directory (hydra.run.dir=... moves it)",
    "enable_checkpointing": "it follows callbacks.model_checkpoint (=null: no checkpoints)",
    "enable_progress_bar": "it follows callbacks.progress_bar (=null: no bar)",
    "enable_model_summary": "it follows callbacks.model_summary (=null: no summary)",
    "plugins": "mlplab sets its own checkpoint writer",
    "barebones": "it turns off the logging and callbacks mlplab's records are made of",
    "num_nodes": "mlplab starts data-parallel ranks on one machine (trainer.devices)",
    "use_distributed_sampler": "mlplab's in-memory batches are sharded across ranks by mlplab",
}


def trainer_arguments() -> list[str]:
    import lightning as L  # only where a run gives a Trainer argument of its own (trainer.options)

    return [name for name in inspect.signature(L.Trainer.__init__).parameters if name != "self"]


def check_trainer_option(key: str) -> None:
    """Refuse what is not a Lightning Trainer argument (naming the closest ones), or one that mlplab manages."""
    if key in MANAGED_ARGUMENTS:
        raise SettingError(key, f"{key}: not settable here; {MANAGED_ARGUMENTS[key]}")
    if key not in trainer_arguments():
        allowed = [name for name in trainer_arguments() if name not in MANAGED_ARGUMENTS]
        raise SettingError(key, f"{key}: not an argument of lightning.Trainer; {closest(key, allowed)}")


@dataclass(frozen=True)
class TrainerSettings:
    """The settings of ``trainer=...``: Lightning Trainer arguments. Those mlplab reads itself are typed fields;
    any other Trainer argument is passed on as given (``options``, checked by name with check_trainer_option)."""

    accelerator: str = "auto"
    strategy: str = "auto"
    devices: int | str = 1  # as trainer=auto gives it; "auto": every device (data-parallel on several GPUs)
    precision: str | int = "32-true"
    max_epochs: int = 10
    deterministic: bool = False
    log_every_n_steps: int = 50
    limit_train_batches: int | float = 1.0
    limit_val_batches: int | float = 1.0
    limit_test_batches: int | float = 1.0
    gradient_clip_val: float | None = None
    num_sanity_val_steps: int = 0
    accumulate_grad_batches: int = 1
    max_time: str | dict | None = None
    max_steps: int = -1
    val_check_interval: int | float | None = None
    check_val_every_n_epoch: int | None = 1
    profiler: str | None = None
    options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        def require(key: str, ok: bool, allowed: str) -> None:
            if not ok:
                raise SettingError(key, f"{key} {allowed} {getattr(self, key)!r}")

        require("accelerator", self.accelerator in ACCELERATORS, f"must be one of {', '.join(ACCELERATORS)}; got")
        require("strategy", self.strategy in STRATEGIES, f"must be one of {', '.join(STRATEGIES)}; got")
        require(
            "devices",
            self.devices == "auto" or (isinstance(self.devices, int) and self.devices >= 1),
            "must be an integer >= 1 or 'auto', got",
        )
        require("precision", self.precision in PRECISIONS, f"must be one of {', '.join(map(str, PRECISIONS))}; got")
        require("max_epochs", self.max_epochs >= 1, "must be an integer >= 1, got")
        require("log_every_n_steps", self.log_every_n_steps >= 1, "must be an integer >= 1, got")
        for key in ("limit_train_batches", "limit_val_batches", "limit_test_batches"):
            value = getattr(self, key)
            require(
                key,
                value > 0 and (isinstance(value, int) or value <= 1),
                "must be a fraction in (0, 1] or a number of batches >= 1, got",
            )
        require(
            "gradient_clip_val",
            self.gradient_clip_val is None or self.gradient_clip_val > 0,
            "must be null or a number > 0, got",
        )
        require("num_sanity_val_steps", self.num_sanity_val_steps >= -1, "must be an integer >= -1, got")
        require("accumulate_grad_batches", self.accumulate_grad_batches >= 1, "must be an integer >= 1, got")
        require("max_steps", self.max_steps >= -1, "must be an integer >= 1, or -1 for no limit, got")
        require(
            "val_check_interval",
            self.val_check_interval is None
            or self.val_check_interval > 0
            and (isinstance(self.val_check_interval, int) or self.val_check_interval <= 1),
            "must be null, a fraction in (0, 1] or a number of batches >= 1, got",
        )
        require(
            "max_time",
            self.max_time is None or _is_duration(self.max_time),
            'must be null, "DD:HH:MM:SS" (e.g. "00:02:30:00") or a mapping such as {hours: 2, minutes: 30}, got',
        )
        require(
            "check_val_every_n_epoch",
            self.check_val_every_n_epoch is None or self.check_val_every_n_epoch >= 1,
            "must be null or an integer >= 1, got",
        )
        for key in self.options:
            check_trainer_option(key)

    @property
    def data_parallel(self) -> bool:
        return self.strategy == "ddp" or (isinstance(self.devices, int) and self.devices > 1)


def _is_duration(value: Any) -> bool:
    """Whether Lightning's Timer reads ``value`` as a duration (checked here, before Lightning prints anything)."""
    if isinstance(value, str):
        return re.fullmatch(r"\d+:\d\d:\d\d:\d\d", value.strip()) is not None
    return (
        isinstance(value, dict)
        and bool(value)
        and all(key in DURATION_UNITS and isinstance(amount, (int, float)) for key, amount in value.items())
    )


# The units of a duration given as a mapping (datetime.timedelta's arguments).
DURATION_UNITS = ("weeks", "days", "hours", "minutes", "seconds", "milliseconds", "microseconds")


def require_accelerator(accelerator: str, key: str, alternative: str) -> None:
    """Refuse ``gpu`` on a machine where CUDA sees none, before any data is loaded."""
    import torch

    if accelerator == "gpu" and not torch.cuda.is_available():
        raise TrainerError(f"{key}=gpu, but this machine has no usable CUDA GPU; {alternative}")


EVERY_N_STEPS = 500  # checkpoint.every_n_steps unless given


@dataclass(frozen=True)
class CheckpointSettings:
    """The settings of ``checkpoint``: how often ``checkpoints/last.ckpt`` is written within an epoch."""

    every_n_steps: int = EVERY_N_STEPS  # 0: only at epoch ends

    def __post_init__(self) -> None:
        if self.every_n_steps < 0:
            raise SettingError(
                "every_n_steps",
                f"every_n_steps must be an integer >= 0 (0: only at epoch ends), got {self.every_n_steps}",
            )
