"""The multilayer perceptron: ``Flatten -> [Linear (-> norm) -> activation (-> Dropout)] x depth -> Linear``."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

from torch import nn

from mlplab.errors import SettingError
from mlplab.model.backbones import Backbone

ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
    "gelu": nn.GELU,
}
OUTPUT_ACTIVATIONS = ("none", *ACTIVATIONS)
# Normalisation of each hidden layer's output, between its Linear and its activation (as in Ioffe & Szegedy).
NORMS: dict[str, type[nn.Module] | None] = {"none": None, "batch": nn.BatchNorm1d, "layer": nn.LayerNorm}


@dataclass(frozen=True)
class MLP(Backbone):
    depth: int = 2  # hidden layers; 0 is multinomial logistic regression
    width: int | list[int] = 512  # units per hidden layer: one for all, or one per layer
    activation: str = "relu"
    dropout: float = 0.0  # after each hidden activation
    norm: str = "none"  # none | batch | layer: after each hidden Linear, before its activation
    # Other than "none", applied to the logits: only to reproduce networks written that way (it clips or squashes).
    output_activation: str = "none"

    size_settings: ClassVar[tuple[str, ...]] = ("width", "depth")

    def __post_init__(self) -> None:
        if self.depth < 0:
            raise SettingError("depth", f"depth must be an integer >= 0, got {self.depth}")
        if isinstance(self.width, list) and len(self.width) != self.depth:
            raise SettingError(
                "width",
                f"width lists {len(self.width)} layer sizes but depth is {self.depth}; give one per hidden layer",
            )
        if any(w < 1 for w in self.widths):
            raise SettingError("width", f"width must be >= 1 (an integer or a list of them), got {self.width}")
        if self.activation not in ACTIVATIONS:
            raise SettingError(
                "activation", f"activation must be one of {', '.join(ACTIVATIONS)}; got {self.activation!r}"
            )
        if not 0 <= self.dropout < 1:
            raise SettingError("dropout", f"dropout must satisfy 0 <= p < 1, got {self.dropout}")
        if self.norm not in NORMS:
            raise SettingError("norm", f"norm must be one of {', '.join(NORMS)}; got {self.norm!r}")
        if self.output_activation not in OUTPUT_ACTIVATIONS:
            raise SettingError(
                "output_activation",
                f"output_activation must be one of {', '.join(OUTPUT_ACTIVATIONS)}; got {self.output_activation!r}",
            )

    @property
    def widths(self) -> list[int]:
        """One width per hidden layer."""
        return [self.width] * self.depth if isinstance(self.width, int) else list(self.width)

    def build(self, input_shape: tuple[int, ...], num_classes: int) -> nn.Sequential:
        layers: list[nn.Module] = [nn.Flatten()]
        in_features = math.prod(input_shape)
        for out_features in self.widths:
            layers.append(nn.Linear(in_features, out_features))
            if NORMS[self.norm] is not None:
                layers.append(NORMS[self.norm](out_features))
            layers.append(ACTIVATIONS[self.activation]())
            if self.dropout > 0:
                layers.append(nn.Dropout(self.dropout))
            in_features = out_features
        layers.append(nn.Linear(in_features, num_classes))
        if self.output_activation != "none":
            layers.append(ACTIVATIONS[self.output_activation]())
        return nn.Sequential(*layers)
