"""The engine of stacked sweeps, its network: K MLPs of one shape trained as one, their weights stacked along a
leading dimension, each layer one batched matrix multiply (``torch.baddbmm``) for all K, and an optimizer step that
applies each network's own numbers.

K networks that differ only in numbers (what may differ is stated in mlplab.sweeps.stack_plan) do the same
computation, so K of them cost little more than one where a single network leaves the device idle. The stack is
made from networks built as single runs build them (so the same initial weights for the same seed), and each can be
taken out again as its own ``nn.Sequential`` state dict. The other parts: the Lightning module that trains a stack
(mlplab.model.stacked_classifier), which jobs stack (mlplab.sweeps.stack_plan), running a stack
(mlplab.sweeps.stack_run).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from mlplab.model.backbones.mlp import ACTIVATIONS, MLP


class StackError(ValueError):
    """Networks that cannot train as one stack; the message says what differs."""


def network_shape(backbone: MLP) -> tuple:
    """What must be equal for MLPs to stack: their layers' widths and activations (dropout may differ)."""
    return (tuple(backbone.widths), backbone.activation, backbone.output_activation)


class StackedMLP(nn.Module):
    """K MLPs of one shape; ``forward`` maps K batches (K x B x C x H x W) to K x B x classes logits."""

    def __init__(self, backbones: Sequence[MLP], networks: Sequence[nn.Sequential]):
        super().__init__()
        shapes = {network_shape(backbone) for backbone in backbones}
        if len(shapes) != 1:
            raise StackError(f"networks of different shapes do not stack: {sorted(map(str, shapes))}")
        first = backbones[0]
        linears = [[module for module in network if isinstance(module, nn.Linear)] for network in networks]
        # Per network, the names of its Linear layers ("1", "3", ...): its state dict's keys. Its own: an MLP without
        # dropout has no Dropout layers, so its layers are numbered otherwise than one with dropout.
        self.layer_names = [
            [name for name, module in network.named_children() if isinstance(module, nn.Linear)] for network in networks
        ]
        # Stored as K x in x out, each network's weight transposed: batched multiplies with a contiguous right-hand
        # side are about a quarter faster on the CPU (benchmarks/stacked_engine.py); optimizers work element-wise,
        # so a network's slice steps as its own weight would.
        self.weights = nn.ParameterList(
            nn.Parameter(torch.stack([layers[i].weight.detach().T for layers in linears]).contiguous())
            for i in range(len(linears[0]))
        )
        self.biases = nn.ParameterList(
            nn.Parameter(torch.stack([layers[i].bias.detach() for layers in linears])) for i in range(len(linears[0]))
        )
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

    def network_parameters(self, index: int) -> list[Tensor]:
        """Network ``index``'s slices of the stacked parameters, in its single network's order (weight, bias, ...)."""
        return [tensor.detach()[index] for pair in zip(self.weights, self.biases) for tensor in pair]

    def network_gradients(self, index: int) -> list[Tensor | None]:
        return [
            None if tensor.grad is None else tensor.grad[index]
            for pair in zip(self.weights, self.biases)
            for tensor in pair
        ]

    def network_state(self, index: int) -> dict[str, Tensor]:
        """Network ``index`` as the single ``nn.Sequential`` its backbone builds would hold it."""
        state = {}
        for name, weight, bias in zip(self.layer_names[index], self.weights, self.biases):
            state[f"{name}.weight"] = weight[index].detach().T.contiguous()
            state[f"{name}.bias"] = bias[index].detach().clone()
        return state


class PerNetworkOptimizer(torch.optim.Optimizer):
    """Each network's own torch optimizer over its slices of the stacked parameters; ``step`` steps them all.

    A network's optimizer is built as its single run builds it (``build[k]``: its class, its numbers, fused where
    that run's is), over the single network's parameters in their order, so its state is the one that network
    would have alone (weights held transposed aside: ``network_state_dict`` turns them back). The slices are views
    of the stacked tensors' storage; before each step each is handed its slice of the stacked gradient.
    A Lightning module can return it as its one optimizer: Lightning counts one step per batch, as for one run.
    """

    def __init__(self, stack: StackedMLP, build: Sequence[Callable[[list[Tensor]], torch.optim.Optimizer]]):
        super().__init__(list(stack.parameters()), {})
        self.stack = stack
        self.slices = [stack.network_parameters(index) for index in range(len(build))]
        self.networks = [make(slices) for make, slices in zip(build, self.slices)]
        self.frozen: set[int] = set()  # networks that no longer step (diverged, pruned)

    def zero_grad(self, set_to_none: bool = True) -> None:
        for param in self.stack.parameters():
            param.grad = None

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for index, (optimizer, slices) in enumerate(zip(self.networks, self.slices)):
            if index in self.frozen:
                continue
            for view, grad in zip(slices, self.stack.network_gradients(index)):
                view.grad = grad
            optimizer.step()
        return loss

    def state_dict(self) -> dict[str, Any]:
        return {"networks": [optimizer.state_dict() for optimizer in self.networks], "frozen": sorted(self.frozen)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        for optimizer, state in zip(self.networks, state_dict["networks"]):
            optimizer.load_state_dict(state)
        self.frozen = set(state_dict["frozen"])

    def network_state_dict(self, index: int) -> dict[str, Any]:
        """Network ``index``'s optimizer state as its single run's optimizer would hold it."""
        state = self.networks[index].state_dict()
        return {
            **state,
            "state": {
                key: {
                    name: value.T.contiguous() if torch.is_tensor(value) and value.dim() == 2 else value
                    for name, value in values.items()
                }
                for key, values in state["state"].items()
            },
        }
