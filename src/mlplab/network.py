"""The network: a plain ``nn.Module`` built from depth, width and activation."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
    "gelu": nn.GELU,
}
OUTPUT_ACTIVATIONS = ("none", *ACTIVATIONS)


def hidden_widths(depth: int, width: int | Sequence[int]) -> list[int]:
    """One width per hidden layer: an integer is repeated ``depth`` times, a list is taken as it is."""
    if isinstance(width, bool) or depth < 0:
        raise ValueError(f"depth must be an integer >= 0 and width an integer or list, got {depth}, {width!r}")
    widths = [width] * depth if isinstance(width, int) else list(width)
    if len(widths) != depth:
        raise ValueError(f"width lists {len(widths)} layer sizes but depth is {depth}")
    if any(isinstance(w, bool) or not isinstance(w, int) or w < 1 for w in widths):
        raise ValueError(f"every width must be an integer >= 1, got {widths}")
    return widths


def build_mlp(
    num_features: int,
    num_classes: int,
    depth: int = 2,
    width: int | Sequence[int] = 512,
    activation: str = "relu",
    dropout: float = 0.0,
    output_activation: str = "none",
) -> nn.Sequential:
    """``Flatten -> [Linear -> activation (-> Dropout)] x depth -> Linear(num_classes)``.

    ``output_activation`` other than "none" is applied to the logits; it exists only to
    reproduce networks written that way (it clips or squashes the logits).
    """
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
    if output_activation not in OUTPUT_ACTIVATIONS:
        raise ValueError(f"output_activation must be one of {list(OUTPUT_ACTIVATIONS)}, got {output_activation!r}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must satisfy 0 <= p < 1, got {dropout}")

    layers: list[nn.Module] = [nn.Flatten()]
    in_features = num_features
    for out_features in hidden_widths(depth, width):
        layers += [nn.Linear(in_features, out_features), ACTIVATIONS[activation]()]
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
        in_features = out_features
    layers.append(nn.Linear(in_features, num_classes))
    if output_activation != "none":
        layers.append(ACTIVATIONS[output_activation]())
    return nn.Sequential(*layers)


def planned_parameters(num_features: int, num_classes: int, depth: int, width: int | Sequence[int]) -> int:
    """The parameter count ``build_mlp`` would produce, without allocating anything."""
    sizes = [num_features, *hidden_widths(depth, width), num_classes]
    return sum((fan_in + 1) * fan_out for fan_in, fan_out in zip(sizes, sizes[1:]))


def count_parameters(network: nn.Module) -> int:
    return sum(p.numel() for p in network.parameters())
