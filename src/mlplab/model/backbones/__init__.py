"""Network families. Each is one module here holding one ``Backbone`` dataclass: its fields are the settings of
``model=<family>`` (validated in ``__post_init__``), ``build`` makes the network. ``conf/model/<name>.yaml`` picks
the family with ``family: <module name>`` and gives the values."""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil
from typing import Any, ClassVar

import torch
from torch import nn


class Backbone:
    """Base of the family dataclasses: ``build(input_shape, num_classes)`` returns an ``nn.Module`` mapping float
    images N x C x H x W to N x num_classes logits."""

    size_settings: ClassVar[tuple[str, ...]] = ()  # the settings that make the network bigger, for messages

    def build(self, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
        raise NotImplementedError

    def planned_size(self, input_shape: tuple[int, ...], num_classes: int) -> tuple[int, int]:
        """(parameters, activation values per sample) of the network ``build`` would make, without allocating
        either: built and run on the meta device, every layer's output counted."""
        outputs = []
        with torch.device("meta"):
            network = self.build(input_shape, num_classes)
            hooks = [
                module.register_forward_hook(lambda _, __, out: outputs.append(out.numel()))
                for module in network.modules()
                if not list(module.children())
            ]
            network.eval()(torch.zeros(1, *input_shape))  # one sample: batch norm counts it only in eval mode
        for hook in hooks:
            hook.remove()
        return count_parameters(network), sum(outputs)

    def as_dict(self) -> dict[str, Any]:
        """Plain values, for checkpoints: ``family`` and every field."""
        return {"family": family_of(type(self)), **dataclasses.asdict(self)}


def families() -> list[str]:
    return sorted(module.name for module in pkgutil.iter_modules(__path__))


def family_of(cls: type[Backbone]) -> str:
    return cls.__module__.removeprefix(f"{__name__}.")


def backbone_class(family: str) -> type[Backbone]:
    """The Backbone dataclass of a family: a module of this package, or a dotted module path of the user's own."""
    if "." not in family and family not in families():
        raise ValueError(f"family must be one of {', '.join(families())} (or a module path); got {family!r}")
    try:
        module = importlib.import_module(family if "." in family else f"{__name__}.{family}")
    except ImportError as error:
        raise ValueError(f"family {family!r}: cannot import it ({error})") from None
    found = [
        value
        for value in vars(module).values()
        if isinstance(value, type)
        and issubclass(value, Backbone)
        and value.__module__ == module.__name__
        and dataclasses.is_dataclass(value)
    ]
    if len(found) != 1:
        raise ValueError(
            f"family {family!r}: its module must define exactly one Backbone dataclass, found {len(found)}"
        )
    return found[0]


def backbone_from_dict(values: dict[str, Any]) -> Backbone:
    """The inverse of ``Backbone.as_dict``."""
    settings = dict(values)
    return backbone_class(settings.pop("family"))(**settings)


def count_parameters(network: nn.Module) -> int:
    return sum(p.numel() for p in network.parameters())
