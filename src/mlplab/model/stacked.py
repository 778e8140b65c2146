"""K networks of one shape trained as one: their weights stacked along a leading dimension, each layer one batched
matrix multiply (``torch.baddbmm``) for all K, and an optimizer step that applies each network's own numbers.

The engine of stacked sweeps: jobs that differ only in numbers (seed, learning rate, weight decay, dropout, momentum,
betas) do the same computation, so K of them cost little more than one where a single network leaves the device
idle. The stack is made from networks built as single runs build them (so the same initial weights for the same
seed), and each can be taken out again as an ordinary ``nn.Sequential`` state dict.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from mlplab.model.backbones.mlp import ACTIVATIONS, MLP


class StackError(ValueError):
    """Networks that cannot train as one stack; the message says what differs."""


def stack_key(backbone: MLP) -> tuple:
    """What must be equal for MLPs to stack: everything but dropout."""
    return (tuple(backbone.widths), backbone.activation, backbone.output_activation)


class StackedMLP(nn.Module):
    """K MLPs of one shape; ``forward`` maps K batches (K x B x C x H x W) to K x B x classes logits."""

    def __init__(self, backbones: Sequence[MLP], networks: Sequence[nn.Sequential]):
        super().__init__()
        shapes = {stack_key(backbone) for backbone in backbones}
        if len(shapes) != 1:
            raise StackError(f"networks of different shapes do not stack: {sorted(map(str, shapes))}")
        first = backbones[0]
        linears = [[module for module in network if isinstance(module, nn.Linear)] for network in networks]
        # The single network's names of its Linear layers ("1", "3", ...): its state dict's keys
        self.layer_names = [name for name, module in networks[0].named_children() if isinstance(module, nn.Linear)]
        # Stored as K x in x out, each network's weight transposed: batched multiplies with a contiguous right-hand
        # side are about a quarter faster on the CPU (benchmarks/stacked_engine.py); optimizers work element-wise,
        # so a network's slice steps as its own weight would.
        self.weights = nn.ParameterList(
            nn.Parameter(torch.stack([layers[i].weight.detach().T for layers in linears]).contiguous())
            for i in range(len(linears[0])))
        self.biases = nn.ParameterList(
            nn.Parameter(torch.stack([layers[i].bias.detach() for layers in linears])) for i in range(len(linears[0])))
        self.register_buffer("dropout", torch.tensor([backbone.dropout for backbone in backbones]))
        self.drops = any(backbone.dropout > 0 for backbone in backbones)  # known here: no device sync per step
        self.activation = ACTIVATIONS[first.activation]()
        self.output_activation = None if first.output_activation == "none" else ACTIVATIONS[first.output_activation]()

    def forward(self, images: Tensor) -> Tensor:
        hidden = images.flatten(2)
        last = len(self.weights) - 1
        for index, (weight, bias) in enumerate(zip(self.weights, self.biases)):
            hidden = torch.baddbmm(bias.unsqueeze(1), hidden, weight)
            if index < last:
                hidden = self._dropped(self.activation(hidden))
        return hidden if self.output_activation is None else self.output_activation(hidden)

    def _dropped(self, hidden: Tensor) -> Tensor:
        """Each network's own dropout rate (inverted dropout, as ``nn.Dropout``)."""
        if not self.training or not self.drops:
            return hidden
        keep = (1 - self.dropout).view(-1, 1, 1).to(hidden.dtype)
        return hidden * (torch.rand_like(hidden) < keep) / keep

    def network_state(self, index: int) -> dict[str, Tensor]:
        """Network ``index`` as the single ``nn.Sequential`` the backbone builds would hold it."""
        state = {}
        for name, weight, bias in zip(self.layer_names, self.weights, self.biases):
            state[f"{name}.weight"] = weight[index].detach().T.contiguous()
            state[f"{name}.bias"] = bias[index].detach().clone()
        return state


class PerNetworkOptimizer:
    """A torch optimizer over each network's slice of the stacked parameters: one param group per network with that
    network's own hyperparameters (lr, betas, weight decay, momentum, ...), and torch's own step (fused where
    ``shared`` asks for it). So each network steps exactly as it would alone, and its state is its own.

    The slices are views of the stacked tensors' storage (leaves, so torch.optim takes them); before each step each
    one is handed its slice of the stacked gradient.
    """

    def __init__(self, stacked: Sequence[nn.Parameter], optimizer_class: type[torch.optim.Optimizer],
                 per_network: Sequence[dict[str, Any]], **shared: Any):
        self.stacked = list(stacked)
        self.slices = [[param.detach()[index] for param in self.stacked] for index in range(len(per_network))]
        groups = [{"params": slices, **arguments} for slices, arguments in zip(self.slices, per_network)]
        self.optimizer = optimizer_class(groups, **shared)

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        """One per network, in stack order: a schedule sets each network's ``lr`` here."""
        return self.optimizer.param_groups

    def zero_grad(self) -> None:
        for param in self.stacked:
            param.grad = None

    def step(self) -> None:
        for position, param in enumerate(self.stacked):
            for index, slices in enumerate(self.slices):
                slices[position].grad = None if param.grad is None else param.grad[index]
        self.optimizer.step()
