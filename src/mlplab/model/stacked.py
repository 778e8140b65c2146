"""K networks of one shape trained as one: their weights stacked along a leading dimension, each layer one batched
matrix multiply (``torch.baddbmm``) for all K, and an optimizer step that applies each network's own numbers.

The engine of stacked sweeps: jobs that differ only in numbers (seed, learning rate, weight decay, dropout, momentum,
betas) do the same computation, so K of them cost little more than one where a single network leaves the device
idle. Each network is built as a single run builds it (the same initial weights for the same seed) and can be taken
out again as an ordinary ``nn.Sequential`` state dict.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from mlplab.model.backbones.mlp import ACTIVATIONS, MLP


class StackError(ValueError):
    """Networks or optimizers that cannot train as one stack; the message says what differs."""


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
        self.weights = nn.ParameterList(
            nn.Parameter(torch.stack([layers[i].weight.detach() for layers in linears])) for i in range(len(linears[0])))
        self.biases = nn.ParameterList(
            nn.Parameter(torch.stack([layers[i].bias.detach() for layers in linears])) for i in range(len(linears[0])))
        self.register_buffer("dropout", torch.tensor([backbone.dropout for backbone in backbones]))
        self.activation = ACTIVATIONS[first.activation]()
        self.output_activation = None if first.output_activation == "none" else ACTIVATIONS[first.output_activation]()

    @property
    def size(self) -> int:
        return len(self.dropout)

    def forward(self, images: Tensor) -> Tensor:
        hidden = images.flatten(2)
        last = len(self.weights) - 1
        for index, (weight, bias) in enumerate(zip(self.weights, self.biases)):
            hidden = torch.baddbmm(bias.unsqueeze(1), hidden, weight.transpose(1, 2))
            if index < last:
                hidden = self._dropped(self.activation(hidden))
        return hidden if self.output_activation is None else self.output_activation(hidden)

    def _dropped(self, hidden: Tensor) -> Tensor:
        """Each network's own dropout rate (inverted dropout, as ``nn.Dropout``)."""
        if not self.training or not bool((self.dropout > 0).any()):
            return hidden
        keep = (1 - self.dropout).view(-1, 1, 1).to(hidden.dtype)
        return hidden * (torch.rand_like(hidden) < keep) / keep

    def network_state(self, index: int) -> dict[str, Tensor]:
        """Network ``index`` as the single ``nn.Sequential`` the backbone builds would hold it."""
        state = {}
        for name, weight, bias in zip(self.layer_names, self.weights, self.biases):
            state[f"{name}.weight"] = weight[index].detach().clone()
            state[f"{name}.bias"] = bias[index].detach().clone()
        return state


def per_network(values: Sequence[float], like: Tensor) -> Tensor:
    """One value per network, shaped to broadcast over a stacked parameter (K x ...)."""
    return torch.tensor(list(values), dtype=like.dtype, device=like.device).view(-1, *([1] * (like.dim() - 1)))


class StackedAdam:
    """Adam (or AdamW with ``decoupled``) over stacked parameters, each network with its own lr, betas, eps and
    weight decay; the same arithmetic as ``torch.optim.Adam``/``AdamW``'s default step, so each network ends where
    it would alone, to rounding. A plain step: amsgrad, maximize and capturable are not stacked."""

    def __init__(self, params: Sequence[nn.Parameter], lr: Sequence[float], betas: Sequence[tuple[float, float]],
                 eps: Sequence[float], weight_decay: Sequence[float], decoupled: bool = False):
        self.params, self.decoupled, self.steps = list(params), decoupled, 0
        self.lr, self.eps, self.weight_decay = list(lr), list(eps), list(weight_decay)
        self.betas = [tuple(pair) for pair in betas]
        self.exp_avg = [torch.zeros_like(p) for p in self.params]
        self.exp_avg_sq = [torch.zeros_like(p) for p in self.params]

    def zero_grad(self) -> None:
        for param in self.params:
            param.grad = None

    @torch.no_grad()
    def step(self) -> None:
        self.steps += 1
        beta1s, beta2s = [b[0] for b in self.betas], [b[1] for b in self.betas]
        correction1 = [1 - beta ** self.steps for beta in beta1s]
        correction2 = [math.sqrt(1 - beta ** self.steps) for beta in beta2s]
        for param, exp_avg, exp_avg_sq in zip(self.params, self.exp_avg, self.exp_avg_sq):
            grad = param.grad
            lr, decay = per_network(self.lr, param), per_network(self.weight_decay, param)
            if self.decoupled:
                param.mul_(1 - lr * decay)
            else:
                grad = grad.addcmul(param, decay)
            exp_avg.lerp_(grad, 1 - per_network(beta1s, param))
            exp_avg_sq.mul_(per_network(beta2s, param)).addcmul_(grad, grad * (1 - per_network(beta2s, param)))
            denom = (exp_avg_sq.sqrt() / per_network(correction2, param)).add_(per_network(self.eps, param))
            param.addcdiv_(exp_avg * (-lr / per_network(correction1, param)), denom)


class StackedSGD:
    """SGD with momentum (heavy ball or Nesterov), dampening and weight decay over stacked parameters, each network
    with its own lr, momentum and weight decay; the arithmetic of ``torch.optim.SGD``'s default step."""

    def __init__(self, params: Sequence[nn.Parameter], lr: Sequence[float], momentum: Sequence[float],
                 weight_decay: Sequence[float], dampening: Sequence[float] | None = None, nesterov: bool = False):
        self.params, self.nesterov = list(params), nesterov
        self.lr, self.momentum, self.weight_decay = list(lr), list(momentum), list(weight_decay)
        # torch damps only with momentum: a network without it steps along its own gradient
        dampening = list(dampening) if dampening is not None else [0.0] * len(self.lr)
        self.dampening = [d if m else 0.0 for d, m in zip(dampening, self.momentum)]
        self.buffers: list[Tensor | None] = [None] * len(self.params)

    def zero_grad(self) -> None:
        for param in self.params:
            param.grad = None

    @torch.no_grad()
    def step(self) -> None:
        for index, param in enumerate(self.params):
            grad = param.grad.addcmul(param, per_network(self.weight_decay, param))
            momentum = per_network(self.momentum, param)
            buffer = self.buffers[index]
            if buffer is None:  # torch starts the buffer at the first gradient, undamped
                buffer = self.buffers[index] = grad.clone()
            else:
                buffer.mul_(momentum).add_(grad * (1 - per_network(self.dampening, param)))
            # without momentum the buffer is the gradient itself, as in torch's step without one
            step = grad.addcmul(buffer, momentum) if self.nesterov else buffer
            param.addcmul_(step, per_network(self.lr, param), value=-1)
