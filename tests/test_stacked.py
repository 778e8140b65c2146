"""The stacked engine: K networks of one shape as one (mlplab.model.stacked_network), against each network trained alone
with torch's own layers and optimizers."""

import functools

import pytest
import torch
import torch.nn.functional as F

from mlplab.model.backbones.mlp import MLP
from mlplab.model.stacked_classifier import StackedClassifier
from mlplab.model.stacked_network import MixedStack, PerNetworkOptimizer, StackedMLP, StackError, stacked_networks

SHAPE, CLASSES, SEEDS = (1, 8, 8), 10, (1, 2, 3)


def networks(backbones: list[MLP]) -> list[torch.nn.Sequential]:
    """Each network as a single run builds it: the seed, then the backbone's build."""
    built = []
    for seed, backbone in zip(SEEDS, backbones):
        torch.manual_seed(seed)
        built.append(backbone.build(SHAPE, CLASSES))
    return built


def batches(steps: int, size: int = 16) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Each network's own batches: K x B images and labels per step."""
    generator = torch.Generator().manual_seed(0)
    return [
        (
            torch.randn(len(SEEDS), size, *SHAPE, generator=generator),
            torch.randint(0, CLASSES, (len(SEEDS), size), generator=generator),
        )
        for _ in range(steps)
    ]


def train_alone_and_stacked(alone, optimizers, stacked, optimizer: PerNetworkOptimizer, steps: int) -> None:
    """``steps`` steps on the same batches: each network alone with its own optimizer, and the stack."""
    for images, labels in batches(steps):
        for k, (network, single) in enumerate(zip(alone, optimizers)):
            single.zero_grad()
            F.cross_entropy(network(images[k]), labels[k]).backward()
            single.step()
        optimizer.zero_grad()
        logits = stacked(images)
        # the sum of the networks' own losses: each network's gradient is its own loss's
        losses = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="none")
        losses.view(len(alone), -1).mean(1).sum().backward()
        optimizer.step()


def test_a_stack_computes_what_each_network_computes_alone():
    backbones = [MLP(depth=2, width=[32, 16], activation="gelu")] * 3
    alone = networks(backbones)
    stacked = StackedMLP(backbones, alone).eval()
    images, _ = batches(1)[0]
    expected = torch.stack([network.eval()(images[k]) for k, network in enumerate(alone)])
    torch.testing.assert_close(stacked(images), expected)
    for k, network in enumerate(alone):  # and each can be taken out as the single network's state
        state = stacked.network_state(k)
        assert state.keys() == network.state_dict().keys()
        assert all(torch.equal(state[key], value) for key, value in network.state_dict().items())


# Each network's own numbers, as torch.optim takes them
OPTIMIZERS = {
    "adam": (
        torch.optim.Adam,
        [
            {"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.0},
            {"lr": 3e-3, "betas": (0.8, 0.99), "eps": 1e-6, "weight_decay": 1e-2},
            {"lr": 1e-2, "betas": (0.95, 0.9), "eps": 1e-7, "weight_decay": 1e-3},
        ],
        {},
    ),
    "fused adamw": (
        torch.optim.AdamW,
        [{"lr": 1e-3, "weight_decay": 0.0}, {"lr": 3e-3, "weight_decay": 0.1}, {"lr": 1e-2, "weight_decay": 0.01}],
        {"fused": True},
    ),
    # equal settings: from the second step, one call of torch's functional Adam for all (compat.adams_stepped_together)
    "fused adam, equal settings": (torch.optim.Adam, [{"lr": 3e-3}] * 3, {"fused": True}),
    "sgd": (
        torch.optim.SGD,
        [
            {"lr": 0.1, "momentum": 0.0, "weight_decay": 0.0},
            {"lr": 0.05, "momentum": 0.9, "weight_decay": 1e-3, "dampening": 0.1},
            {"lr": 0.01, "momentum": 0.5, "weight_decay": 1e-2, "nesterov": True},
        ],
        {},
    ),
}


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_each_network_of_a_stack_trains_as_it_would_alone_with_its_own_numbers(name):
    optimizer_class, per_network, shared = OPTIMIZERS[name]
    backbones = [MLP(depth=2, width=32)] * 3
    alone = networks(backbones)
    stacked = StackedMLP(backbones, networks(backbones))
    optimizers = [
        optimizer_class(network.parameters(), **arguments, **shared) for network, arguments in zip(alone, per_network)
    ]
    optimizer = PerNetworkOptimizer(
        stacked, [functools.partial(optimizer_class, **arguments, **shared) for arguments in per_network]
    )
    train_alone_and_stacked(alone, optimizers, stacked, optimizer, steps=20)
    for k, network in enumerate(alone):
        for key, value in network.state_dict().items():
            torch.testing.assert_close(stacked.network_state(k)[key], value, rtol=1e-4, atol=1e-6)
        # and its optimizer state is its own, as the single network's optimizer holds it
        single_state, stacked_state = optimizers[k].state_dict(), optimizer.network_state_dict(k)
        assert single_state["param_groups"] == stacked_state["param_groups"]
        assert single_state["state"].keys() == stacked_state["state"].keys()
        for index, values in single_state["state"].items():
            assert values.keys() == stacked_state["state"][index].keys()
            for key, value in values.items():
                torch.testing.assert_close(stacked_state["state"][index][key], value, rtol=1e-4, atol=1e-6)
    assert not torch.equal(stacked.network_state(0)["1.weight"], networks(backbones)[0].state_dict()["1.weight"])


def test_each_network_drops_out_at_its_own_rate():
    backbones = [MLP(depth=1, width=256, dropout=p) for p in (0.0, 0.5, 0.2)]
    stacked = StackedMLP(backbones, networks(backbones))
    images, _ = batches(1, size=64)[0]
    torch.manual_seed(0)
    trained = stacked.train()(images)
    evaluated = stacked.eval()(images)
    torch.testing.assert_close(trained[0], evaluated[0])  # no dropout: training and evaluation agree
    assert not torch.allclose(trained[1], evaluated[1])
    kept = stacked.train()._dropped(
        torch.ones(3, 64, 256), stacked.dropout
    )  # the share kept, scaled as nn.Dropout scales it
    assert kept[0].eq(1).all()
    for k, rate in ((1, 0.5), (2, 0.2)):
        assert abs(kept[k].eq(0).float().mean().item() - rate) < 0.02
        assert torch.allclose(kept[k][kept[k] > 0], torch.tensor(1 / (1 - rate)))


def test_networks_of_different_shapes_do_not_stack():
    backbones = [MLP(depth=2, width=32), MLP(depth=2, width=64)]
    with pytest.raises(StackError, match="different shapes"):
        StackedMLP(backbones, networks(backbones))


def test_each_network_is_taken_out_under_its_own_layer_names():
    # An MLP without dropout has no Dropout layers: its Linear layers are "1", "3", "5"; with dropout "1", "4", "7".
    backbones = [MLP(depth=2, width=32, dropout=p) for p in (0.0, 0.2, 0.0)]
    alone = networks(backbones)
    stacked = StackedMLP(backbones, alone)
    assert sorted(stacked.network_state(0)) == ["1.bias", "1.weight", "3.bias", "3.weight", "5.bias", "5.weight"]
    assert sorted(stacked.network_state(1)) == ["1.bias", "1.weight", "4.bias", "4.weight", "7.bias", "7.weight"]
    for k, backbone in enumerate(backbones):  # each loads into its own single network, as mlplab-eval loads it
        torch.manual_seed(99)
        single = backbone.build(SHAPE, CLASSES)
        single.load_state_dict(stacked.network_state(k))
        for key, value in alone[k].state_dict().items():
            assert torch.equal(single.state_dict()[key], value)


def test_the_stacks_training_loss_is_each_networks_smoothed_loss():
    # Network 0 answers class 0 with logits 10, 0, ..., 0 (right, confident); network 1 answers uniformly.
    logits = torch.stack([torch.tensor([[10.0] + [0.0] * 9] * 3), torch.zeros(3, 10)])
    labels = torch.zeros(2, 3, dtype=torch.long)
    smoothed = StackedClassifier._losses(None, logits, labels, 0.1)
    assert smoothed.tolist() == pytest.approx([0.90041, 2.302585], abs=1e-5)  # uniform: ln 10 either way
    assert StackedClassifier._losses(None, logits, labels).tolist() == pytest.approx([0.00041, 2.302585], abs=1e-5)


@pytest.mark.parametrize("order", ["shapes side by side", "shapes interleaved"])
def test_networks_of_several_shapes_stack_and_each_trains_as_it_would_alone(order):
    shapes = [MLP(depth=1, width=32), MLP(depth=2, width=[16, 8], activation="tanh"), MLP(depth=1, width=32)]
    if order == "shapes side by side":
        shapes = [shapes[0], shapes[2], shapes[1]]
    alone = networks(shapes)
    stacked = stacked_networks(shapes, networks(shapes))
    assert isinstance(stacked, MixedStack) and len(stacked.groups) == 2
    settings = OPTIMIZERS["adam"][1]
    optimizers = [torch.optim.Adam(network.parameters(), **arguments) for network, arguments in zip(alone, settings)]
    optimizer = PerNetworkOptimizer(
        stacked, [functools.partial(torch.optim.Adam, **arguments) for arguments in settings]
    )
    train_alone_and_stacked(alone, optimizers, stacked, optimizer, steps=10)
    for k, network in enumerate(alone):
        assert stacked.network_state(k).keys() == network.state_dict().keys()
        for key, value in network.state_dict().items():
            torch.testing.assert_close(stacked.network_state(k)[key], value, rtol=1e-4, atol=1e-6)
    images, _ = batches(1)[0]
    expected = torch.stack([network.eval()(images[k]) for k, network in enumerate(alone)])
    torch.testing.assert_close(stacked.eval()(images), expected, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("norm", ["batch", "layer"])
def test_normalised_networks_stack_and_each_trains_as_it_would_alone(norm):
    # Networks of one norm are one batched network; with dropout, without, and beside an unnormalised shape.
    shapes = [MLP(depth=2, width=16, norm=norm), MLP(depth=2, width=16, norm=norm, dropout=0.2), MLP(depth=1, width=8)]
    alone = networks(shapes)
    stacked = stacked_networks(shapes, networks(shapes))
    # SGD: the gradient of a Linear's bias before batch norm is zero but for rounding, which Adam would scale up to
    # full steps of either sign, alone as in the stack.
    settings = OPTIMIZERS["sgd"][1]
    optimizers = [torch.optim.SGD(network.parameters(), **arguments) for network, arguments in zip(alone, settings)]
    optimizer = PerNetworkOptimizer(
        stacked, [functools.partial(torch.optim.SGD, **arguments) for arguments in settings]
    )
    torch.manual_seed(5)  # dropout: the stack draws its own masks, so network 1 is compared by its layers' names only
    train_alone_and_stacked(alone, optimizers, stacked, optimizer, steps=10)
    names = {
        "batch": ["weight", "bias", "running_mean", "running_var", "num_batches_tracked"],
        "layer": ["weight", "bias"],
    }
    for k in (0, 2):
        assert stacked.network_state(k).keys() == alone[k].state_dict().keys()
        for key, value in alone[k].state_dict().items():
            torch.testing.assert_close(stacked.network_state(k)[key], value, rtol=1e-4, atol=1e-6)
    assert sorted(key for key in stacked.network_state(1) if key.startswith("2.")) == sorted(
        f"2.{n}" for n in names[norm]
    )
    if norm == "batch":
        assert stacked.network_state(0)["2.num_batches_tracked"].item() == 10
    images, _ = batches(1)[0]
    expected = torch.stack([network.eval()(images[k]) for k, network in enumerate(alone)])
    torch.testing.assert_close(stacked.eval()(images)[0], expected[0], rtol=1e-4, atol=1e-6)


def test_a_normalised_network_that_leaves_keeps_its_statistics_while_the_others_go_on():
    shapes = [MLP(depth=1, width=16, norm="batch")] * 3
    alone = networks(shapes)
    stacked = StackedMLP(shapes, networks(shapes)).train()
    images, _ = batches(1)[0]
    stacked(images)
    before = stacked.network_state(1)
    stacked.leave(1)
    stacked(images + 1)
    after = [stacked.network_state(k) for k in range(3)]
    for key in ("2.running_mean", "2.running_var", "2.num_batches_tracked"):
        assert torch.equal(after[1][key], before[key])  # network 1 left: its statistics stay
    assert after[0]["2.num_batches_tracked"].item() == after[2]["2.num_batches_tracked"].item() == 2
    single = alone[2].train()
    single(images[2])
    single(images[2] + 1)
    torch.testing.assert_close(after[2]["2.running_mean"], single.state_dict()["2.running_mean"])


def step_flops(stacked: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor) -> int:
    """The floating-point operations of one training step's forward and backward passes, as torch counts them."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        logits = stacked(images)
        F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="none").view(len(images), -1).mean(
            1
        ).sum().backward()
    return counter.get_total_flops()


@pytest.mark.parametrize("optimizer_class", [torch.optim.SGD, functools.partial(torch.optim.Adam, fused=True)])
@pytest.mark.parametrize("shapes", ["one shape", "two shapes"])
def test_a_network_that_leaves_the_stack_is_no_longer_computed_and_the_others_train_on(shapes, optimizer_class):
    backbones = [MLP(depth=1, width=64)] * 4
    if shapes == "two shapes":
        backbones = [MLP(depth=1, width=64), MLP(depth=2, width=32), MLP(depth=1, width=64), MLP(depth=2, width=32)]
    torch.manual_seed(0)
    built = [backbone.build(SHAPE, CLASSES) for backbone in backbones]
    stacked = stacked_networks(backbones, built)
    optimizer = PerNetworkOptimizer(stacked, [functools.partial(optimizer_class, lr=0.1)] * 4)
    generator = torch.Generator().manual_seed(1)
    images, labels = (
        torch.randn(4, 16, *SHAPE, generator=generator),
        torch.randint(0, CLASSES, (4, 16), generator=generator),
    )
    step_flops(stacked, images, labels)
    optimizer.step()  # a first step, one optimizer after another; equal Adams step in one call from the next
    optimizer.zero_grad()
    four = step_flops(stacked, images, labels)
    optimizer.zero_grad()
    stacked.leave(1)  # as a search's pruner or a divergence takes network 1 out after an epoch
    optimizer.frozen.add(1)
    before = {k: stacked.network_state(k) for k in range(4)}
    three = step_flops(stacked, images, labels)
    optimizer.step()
    # each network's share of the step is its own work, and network 1's is gone
    own = [
        step_flops(stacked_networks([b], [n]), images[k : k + 1], labels[k : k + 1])
        for k, (b, n) in enumerate(zip(backbones, built))
    ]
    assert four == sum(own) and three == four - own[1]
    assert stacked(images)[1].eq(0).all()  # its rows: zeros, its weights as they were
    assert all(torch.equal(before[1][key], value) for key, value in stacked.network_state(1).items())
    for k in (0, 2, 3):  # the others stepped
        assert not torch.equal(before[k]["1.weight"], stacked.network_state(k)["1.weight"])
