"""The engine of stacked sweeps, its network: K MLPs of one shape trained as one, their weights stacked along a
leading dimension, each layer one batched matrix multiply (``torch.baddbmm``) for all K, and an optimizer step that
applies each network's own numbers. MLPs of several shapes are one such network per shape (MixedStack).

K networks of one shape (what else may differ is stated in mlplab.sweeps.stack_plan) do the same
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
import torch.nn.functional as F
from torch import Tensor, nn

from mlplab.compat import adams_stepped_together
from mlplab.model.backbones.mlp import ACTIVATIONS, MLP

NORM_LAYERS = (nn.BatchNorm1d, nn.LayerNorm)  # mlplab.model.backbones.mlp.NORMS
BATCH_STATISTICS = ("running_mean", "running_var", "num_batches_tracked")  # nn.BatchNorm1d's buffers


class StackError(ValueError):
    """Networks that cannot train as one stack; the message says what differs."""


def network_shape(backbone: MLP) -> tuple:
    """What must be equal for MLPs to stack as one batched network: their layers' widths, normalisation and
    activations (dropout may differ)."""
    return (tuple(backbone.widths), backbone.norm, backbone.activation, backbone.output_activation)


class StackedMLP(nn.Module):
    """K MLPs of one shape; ``forward`` maps K batches (K x B x C x H x W) to K x B x classes logits."""

    def __init__(self, backbones: Sequence[MLP], networks: Sequence[nn.Sequential]):
        super().__init__()
        shapes = {network_shape(backbone) for backbone in backbones}
        if len(shapes) != 1:
            raise StackError(f"networks of different shapes do not stack: {sorted(map(str, shapes))}")
        first = backbones[0]
        linears = [[module for module in network if isinstance(module, nn.Linear)] for network in networks]
        norms = [[module for module in network if isinstance(module, NORM_LAYERS)] for network in networks]
        # Per network, the names of its Linear and norm layers ("1", "3", ...): its state dict's keys. Its own: an
        # MLP without dropout has no Dropout layers, so its layers are numbered otherwise than one with dropout.
        self.layer_names = [
            [name for name, module in network.named_children() if isinstance(module, nn.Linear)] for network in networks
        ]
        self.norm_names = [
            [name for name, module in network.named_children() if isinstance(module, NORM_LAYERS)]
            for network in networks
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
        # Each hidden layer's normalisation (model.norm): its scale and shift per network, K x width, and batch
        # norm's running statistics per network (K x width, and K batches counted).
        self.norm = first.norm
        # Its eps and momentum (equal for all: one shape), as numbers: the layer itself stays its network's.
        self.norm_eps = norms[0][0].eps if norms[0] else 0.0
        self.norm_momentum = norms[0][0].momentum if norms[0] and first.norm == "batch" else None
        self.norm_weights = nn.ParameterList(
            nn.Parameter(torch.stack([layers[i].weight.detach() for layers in norms])) for i in range(len(norms[0]))
        )
        self.norm_biases = nn.ParameterList(
            nn.Parameter(torch.stack([layers[i].bias.detach() for layers in norms])) for i in range(len(norms[0]))
        )
        for i in range(len(norms[0]) if first.norm == "batch" else 0):
            for statistic in BATCH_STATISTICS:
                self.register_buffer(
                    f"{statistic}_{i}", torch.stack([getattr(layers[i], statistic) for layers in norms])
                )
        self.register_buffer("dropout", torch.tensor([backbone.dropout for backbone in backbones]))
        self.drops = any(backbone.dropout > 0 for backbone in backbones)  # known here: no device sync per step
        # The networks still computed, once one has left the stack (a buffer: it moves to the device with them).
        self.register_buffer("staying", None, persistent=False)
        self.activation = ACTIVATIONS[first.activation]()
        self.output_activation = None if first.output_activation == "none" else ACTIVATIONS[first.output_activation]()

    def forward(self, images: Tensor) -> Tensor:
        if self.staying is None:
            return self._computed(images.flatten(2), None)
        # Only the networks still training: their slices taken out, their results put back among zeros.
        index = self.staying
        if len(index) == 0:  # every network of this shape has left (a MixedStack's): nothing to compute
            return images.new_zeros(*images.shape[:2], self.biases[-1].shape[-1])
        logits = self._computed(images.index_select(0, index).flatten(2), index)
        return logits.new_zeros(images.shape[0], *logits.shape[1:]).index_copy(0, index, logits)

    def _computed(self, hidden: Tensor, index: Tensor | None) -> Tensor:
        """The networks' logits (``index``: those still computed, None for all)."""

        def taken(tensor: Tensor) -> Tensor:
            return tensor if index is None else tensor.index_select(0, index)

        last = len(self.weights) - 1
        rates = taken(self.dropout)
        for layer, (weight, bias) in enumerate(zip(self.weights, self.biases)):
            hidden = torch.baddbmm(taken(bias).unsqueeze(1), hidden, taken(weight))
            if layer < last:
                if self.norm != "none":
                    hidden = self._normalised(hidden, layer, index, taken)
                hidden = self._dropped(self.activation(hidden), rates)
        return hidden if self.output_activation is None else self.output_activation(hidden)

    def _normalised(self, hidden: Tensor, layer: int, index: Tensor | None, taken: Callable) -> Tensor:
        """Hidden layer ``layer``'s normalisation, each network's own (K x B x width), as its norm layer computes it."""
        scale, shift = taken(self.norm_weights[layer]).unsqueeze(1), taken(self.norm_biases[layer]).unsqueeze(1)
        if self.norm == "layer":
            return F.layer_norm(hidden, hidden.shape[-1:], eps=self.norm_eps) * scale + shift
        # Batch norm: each network's features are channels of their own; statistics over its batch only.
        means, variances, counts = (getattr(self, f"{statistic}_{layer}") for statistic in BATCH_STATISTICS)
        mean, variance = taken(means), taken(variances)
        k, batch, width = hidden.shape
        normed = F.batch_norm(
            hidden.transpose(0, 1).reshape(batch, k * width),
            mean.view(-1),
            variance.view(-1),
            training=self.training,
            momentum=self.norm_momentum,
            eps=self.norm_eps,
        )
        if self.training:  # the running statistics F.batch_norm updated, back in place, and one batch more counted
            with torch.no_grad():
                if index is not None:
                    means.index_copy_(0, index, mean)
                    variances.index_copy_(0, index, variance)
                if index is None:
                    counts.add_(1)
                else:
                    counts.index_add_(0, index, torch.ones_like(index))
        return normed.view(batch, k, width).transpose(0, 1) * scale + shift

    def _dropped(self, hidden: Tensor, rates: Tensor) -> Tensor:
        """Each network's own dropout rate (inverted dropout, as ``nn.Dropout``)."""
        if not self.training or not self.drops:
            return hidden
        keep = (1 - rates).view(-1, 1, 1).to(hidden.dtype)
        return hidden * (torch.rand_like(hidden) < keep) / keep

    def leave(self, index: int) -> None:
        """Stop computing network ``index`` (pruned, diverged): from the next step the stack does only the other
        networks' work. Its output rows are zeros from then on, and its weights stay as they were."""
        staying = range(len(self.dropout)) if self.staying is None else self.staying.tolist()
        self.staying = torch.tensor([k for k in staying if k != index], device=self.dropout.device)

    def _parameters_in_order(self) -> list[Tensor]:
        """The stacked parameters in a single network's order: each layer's weight and bias, then its norm's."""
        ordered = []
        for layer, pair in enumerate(zip(self.weights, self.biases)):
            ordered += pair
            if layer < len(self.norm_weights):
                ordered += [self.norm_weights[layer], self.norm_biases[layer]]
        return ordered

    def network_parameters(self, index: int) -> list[Tensor]:
        """Network ``index``'s slices of the stacked parameters, in its single network's order (weight, bias, ...)."""
        return [tensor.detach()[index] for tensor in self._parameters_in_order()]

    def gradients(self) -> list[list[Tensor | None]]:
        """Per network, its slices of the stacked gradients, in its single network's order."""
        size = len(self.dropout)
        slices = [[None] * size if t.grad is None else t.grad.unbind(0) for t in self._parameters_in_order()]
        return [list(network) for network in zip(*slices)]

    def network_state(self, index: int) -> dict[str, Tensor]:
        """Network ``index`` as the single ``nn.Sequential`` its backbone builds would hold it."""
        state = {}
        for name, weight, bias in zip(self.layer_names[index], self.weights, self.biases):
            state[f"{name}.weight"] = weight[index].detach().T.contiguous()
            state[f"{name}.bias"] = bias[index].detach().clone()
        for layer, (name, weight, bias) in enumerate(zip(self.norm_names[index], self.norm_weights, self.norm_biases)):
            state[f"{name}.weight"] = weight[index].detach().clone()
            state[f"{name}.bias"] = bias[index].detach().clone()
            if self.norm == "batch":
                for statistic in BATCH_STATISTICS:
                    state[f"{name}.{statistic}"] = getattr(self, f"{statistic}_{layer}")[index].clone()
        return state


class MixedStack(nn.Module):
    """K MLPs of several shapes (widths, depths, activations): the networks of each shape one StackedMLP, computed
    one shape after another in the same step. Nothing is padded: each network does its own arithmetic, and what
    a stack saves over K single runs (one training loop, one pass over the batches, one process) is shared by all.

    The same interface as StackedMLP, network by network in the order given: ``forward`` maps K batches to K x B x
    classes logits, and each network's parameters, gradients and single-network state are its shape's slices.
    """

    def __init__(self, backbones: Sequence[MLP], networks: Sequence[nn.Sequential]):
        super().__init__()
        members: dict[tuple, list[int]] = {}
        for index, backbone in enumerate(backbones):
            members.setdefault(network_shape(backbone), []).append(index)
        self.members = list(members.values())  # per shape, its networks' indices in the stack
        self.groups = nn.ModuleList(
            StackedMLP([backbones[i] for i in indices], [networks[i] for i in indices]) for indices in self.members
        )
        self.place = {
            index: (group, position)
            for group, indices in enumerate(self.members)
            for position, index in enumerate(indices)
        }
        # Each shape's networks side by side in the stack (the plan orders them so): slices, not gathers.
        self.contiguous = all(indices == list(range(indices[0], indices[0] + len(indices))) for indices in self.members)
        order = [index for indices in self.members for index in indices]
        self.register_buffer("order", torch.tensor(order), persistent=False)
        self.register_buffer("restore", torch.argsort(torch.tensor(order)), persistent=False)

    def forward(self, images: Tensor) -> Tensor:
        if self.contiguous:
            return torch.cat([group(images[i[0] : i[-1] + 1]) for group, i in zip(self.groups, self.members)])
        ordered = images.index_select(0, self.order)
        outputs, start = [], 0
        for group, indices in zip(self.groups, self.members):
            outputs.append(group(ordered[start : start + len(indices)]))
            start += len(indices)
        return torch.cat(outputs).index_select(0, self.restore)

    def leave(self, index: int) -> None:
        """Stop computing network ``index``; a shape none of whose networks is left is no longer computed."""
        group, position = self.place[index]
        self.groups[group].leave(position)

    def network_parameters(self, index: int) -> list[Tensor]:
        group, position = self.place[index]
        return self.groups[group].network_parameters(position)

    def gradients(self) -> list[list[Tensor | None]]:
        by_group = [group.gradients() for group in self.groups]
        return [by_group[group][position] for group, position in (self.place[i] for i in range(len(self.place)))]

    def network_state(self, index: int) -> dict[str, Tensor]:
        group, position = self.place[index]
        return self.groups[group].network_state(position)


def stacked_networks(backbones: Sequence[MLP], networks: Sequence[nn.Sequential]) -> StackedMLP | MixedStack:
    """The stacked network of K MLPs: one batched StackedMLP where they share a shape (the fast path, and the
    checkpoint layout of earlier versions), else a MixedStack of one per shape."""
    if len({network_shape(backbone) for backbone in backbones}) == 1:
        return StackedMLP(backbones, networks)
    return MixedStack(backbones, networks)


class PerNetworkOptimizer(torch.optim.Optimizer):
    """Each network's own torch optimizer over its slices of the stacked parameters; ``step`` steps them all.

    A network's optimizer is built as its single run builds it (``build[k]``: its class, its numbers, fused where
    that run's is), over the single network's parameters in their order, so its state is the one that network
    would have alone (weights held transposed aside: ``network_state_dict`` turns them back). The slices are views
    of the stacked tensors' storage; before each step each is handed its slice of the stacked gradient.
    A Lightning module can return it as its one optimizer: Lightning counts one step per batch, as for one run.
    """

    def __init__(
        self, stack: StackedMLP | MixedStack, build: Sequence[Callable[[list[Tensor]], torch.optim.Optimizer]]
    ):
        super().__init__(list(stack.parameters()), {})
        self.stack = stack
        self.slices = [stack.network_parameters(index) for index in range(len(build))]
        self.networks = [make(slices) for make, slices in zip(build, self.slices)]
        self.frozen: set[int] = set()  # networks that no longer step (diverged, pruned)
        self.stepped_each = False  # each network's optimizer has stepped once here (its state made, its schedule told)

    def zero_grad(self, set_to_none: bool = True) -> None:
        for param in self.stack.parameters():
            param.grad = None

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        stepping = []
        for index, (optimizer, slices, grads) in enumerate(zip(self.networks, self.slices, self.stack.gradients())):
            if index not in self.frozen:
                for view, grad in zip(slices, grads):
                    view.grad = grad
                stepping.append(optimizer)
        # Adams with equal settings in one call (the same arithmetic); the first step, and others, one by one.
        if not (self.stepped_each and adams_stepped_together(stepping)):
            for optimizer in stepping:
                optimizer.step()
            self.stepped_each = True
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
