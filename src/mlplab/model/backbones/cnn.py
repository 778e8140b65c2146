"""A small convolutional reference: ``[Conv -> BatchNorm -> activation -> MaxPool] x blocks -> Flatten ->
Linear(hidden) -> activation (-> Dropout) -> Linear(num_classes)``, to put the MLPs next to."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar

from torch import nn

from mlplab.errors import SettingError
from mlplab.model.backbones import Backbone
from mlplab.model.backbones.mlp import ACTIVATIONS


@dataclass(frozen=True)
class CNN(Backbone):
    # Output channels of each conv block; each block halves height and width.
    channels: list[int] = field(default_factory=lambda: [32, 64])
    kernel_size: int = 3
    hidden: int = 128  # units of the hidden Linear layer of the head; 0 for none
    activation: str = "relu"
    batch_norm: bool = True
    dropout: float = 0.0  # before the last Linear

    size_settings: ClassVar[tuple[str, ...]] = ("channels", "hidden")

    def __post_init__(self) -> None:
        if not self.channels or any(c < 1 for c in self.channels):
            raise SettingError("channels", f"channels must be a non-empty list of integers >= 1, got {self.channels}")
        if self.kernel_size < 1 or self.kernel_size % 2 == 0:
            raise SettingError(
                "kernel_size",
                f"kernel_size must be an odd integer >= 1 (the padding keeps the size), got {self.kernel_size}",
            )
        if self.hidden < 0:
            raise SettingError("hidden", f"hidden must be an integer >= 0, got {self.hidden}")
        if self.activation not in ACTIVATIONS:
            raise SettingError(
                "activation", f"activation must be one of {', '.join(ACTIVATIONS)}; got {self.activation!r}"
            )
        if not 0 <= self.dropout < 1:
            raise SettingError("dropout", f"dropout must satisfy 0 <= p < 1, got {self.dropout}")

    def build(self, input_shape: tuple[int, ...], num_classes: int) -> nn.Sequential:
        in_channels, height, width = input_shape
        if min(height, width) >> len(self.channels) < 1:
            raise SettingError(
                "channels",
                f"channels: {len(self.channels)} blocks halve {height}x{width} images to nothing; "
                f"use at most {int(math.log2(min(height, width)))}",
            )
        layers: list[nn.Module] = []
        for out_channels in self.channels:
            layers += [
                nn.Conv2d(
                    in_channels, out_channels, self.kernel_size, padding=self.kernel_size // 2, bias=not self.batch_norm
                )
            ]
            if self.batch_norm:
                layers.append(nn.BatchNorm2d(out_channels))
            layers += [ACTIVATIONS[self.activation](), nn.MaxPool2d(2)]
            in_channels, height, width = out_channels, height // 2, width // 2
        layers.append(nn.Flatten())
        features = in_channels * height * width
        if self.hidden:
            layers += [nn.Linear(features, self.hidden), ACTIVATIONS[self.activation]()]
            features = self.hidden
        if self.dropout > 0:
            layers.append(nn.Dropout(self.dropout))
        layers.append(nn.Linear(features, num_classes))
        return nn.Sequential(*layers)
