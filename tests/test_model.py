import json

import lightning as L
import pytest
import torch
from conftest import stopped_and_resumed, train_in_process
from torch import nn

from mlplab.cli.evaluate import evaluate, load_data, load_model
from mlplab.errors import SettingError
from mlplab.model.backbones import count_parameters
from mlplab.model.backbones.cnn import CNN
from mlplab.model.backbones.mlp import ACTIVATIONS, MLP
from mlplab.model.classifier import ImageClassifier
from mlplab.run.averaging import SWAWeights
from mlplab.run.config import ConfigError


def build_mlp(input_shape, num_classes, **settings):
    return MLP(**settings).build(input_shape, num_classes)


def linears(network: nn.Module) -> list[nn.Linear]:
    return [m for m in network if isinstance(m, nn.Linear)]


@pytest.mark.parametrize("depth", [0, 1, 2, 3])
def test_depth_sets_hidden_layers_and_shapes(depth):
    network = build_mlp((1, 28, 28), 10, depth=depth, width=64)
    layers = linears(network)
    assert len(layers) == depth + 1
    assert isinstance(network[0], nn.Flatten)
    assert layers[0].in_features == 784
    assert [layer.out_features for layer in layers] == [64] * depth + [10]
    assert network(torch.zeros(5, 1, 28, 28)).shape == (5, 10)


def test_depth_zero_is_logistic_regression():
    network = build_mlp((1, 28, 28), 10, depth=0, width=1)
    assert [type(m) for m in network] == [nn.Flatten, nn.Linear]
    assert count_parameters(network) == 784 * 10 + 10


def test_list_width_gives_one_size_per_layer():
    network = build_mlp((3, 32, 32), 10, depth=3, width=[256, 128, 64])
    assert [(layer.in_features, layer.out_features) for layer in linears(network)] == [
        (3072, 256),
        (256, 128),
        (128, 64),
        (64, 10),
    ]
    assert network(torch.zeros(2, 3, 32, 32)).shape == (2, 10)


LAYER_OF = {"relu": nn.ReLU, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid, "gelu": nn.GELU}


def test_the_activations_offered_are_these():
    assert sorted(ACTIVATIONS) == sorted(LAYER_OF)


@pytest.mark.parametrize("name", sorted(LAYER_OF))
def test_each_activation_follows_each_hidden_linear(name):
    network = build_mlp((1, 28, 28), 10, depth=2, width=32, activation=name)
    kinds = [type(m) for m in network]
    assert kinds == [nn.Flatten, nn.Linear, LAYER_OF[name], nn.Linear, LAYER_OF[name], nn.Linear]


def test_dropout_after_each_activation_only_when_asked():
    assert not any(isinstance(m, nn.Dropout) for m in build_mlp((1, 28, 28), 10, depth=2, width=8))
    dropouts = [m for m in build_mlp((1, 28, 28), 10, depth=2, width=8, dropout=0.25) if isinstance(m, nn.Dropout)]
    assert [d.p for d in dropouts] == [0.25, 0.25]


def test_output_activation_clips_logits():
    network = build_mlp((1, 28, 28), 10, depth=1, width=16, output_activation="relu")
    assert isinstance(network[-1], nn.ReLU)
    assert (network(torch.randn(64, 1, 28, 28)) >= 0).all()


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"depth": -1}, "depth"),
        ({"depth": 2, "width": 0}, "width"),
        ({"depth": 2, "width": [64]}, "depth is 2"),
        ({"activation": "swish"}, "activation"),
        ({"dropout": 1.0}, "dropout"),
    ],
)
def test_invalid_shapes_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        build_mlp((1, 28, 28), 10, **kwargs)


def test_the_cnn_reference_trains_through_the_same_module(synthetic_data_dir, tmp_path):
    state = train_in_process(synthetic_data_dir, tmp_path, ["model=cnn", "model.channels=[4,8]", "model.hidden=16"])
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["status"] == "completed" and metrics["test/acc"] > 0.5
    # 28x28 halved twice: 7x7 maps of 8 channels feed the head's hidden layer.
    assert state["state_dict"]["network.0.weight"].shape == (4, 1, 3, 3)
    assert state["state_dict"]["network.9.weight"].shape == (16, 8 * 7 * 7)
    assert state["hyper_parameters"]["backbone"] == {
        "family": "cnn",
        "channels": [4, 8],
        "kernel_size": 3,
        "hidden": 16,
        "activation": "relu",
        "batch_norm": True,
        "dropout": 0.0,
    }


def test_cnn_settings_that_do_not_fit_the_images_are_refused():
    with pytest.raises(ValueError, match="kernel_size must be an odd integer"):
        CNN(kernel_size=4)
    with pytest.raises(ValueError, match="channels: 5 blocks halve 28x28 images to nothing; use at most 4"):
        CNN(channels=[2] * 5).planned_size((1, 28, 28), 10)


def test_norm_sits_between_each_hidden_linear_and_its_activation():
    batch = build_mlp((1, 28, 28), 10, depth=2, width=8, norm="batch", dropout=0.1)
    assert [type(m) for m in batch] == [
        nn.Flatten,
        nn.Linear,
        nn.BatchNorm1d,
        nn.ReLU,
        nn.Dropout,
        nn.Linear,
        nn.BatchNorm1d,
        nn.ReLU,
        nn.Dropout,
        nn.Linear,
    ]
    layer = build_mlp((1, 28, 28), 10, depth=1, width=8, norm="layer")
    assert [type(m) for m in layer] == [nn.Flatten, nn.Linear, nn.LayerNorm, nn.ReLU, nn.Linear]
    assert count_parameters(layer) == 784 * 8 + 8 + 2 * 8 + 8 * 10 + 10  # LayerNorm: a weight and a bias per unit
    with pytest.raises(SettingError, match="norm must be one of none, batch, layer; got 'group'"):
        build_mlp((1, 28, 28), 10, depth=1, width=8, norm="group")


@pytest.mark.parametrize("norm", ["batch", "layer"])
def test_a_normalised_network_stopped_after_an_epoch_resumes_exactly(norm, synthetic_data_dir, tmp_path):
    overrides = [f"model.norm={norm}", "trainer.deterministic=true"]
    straight = train_in_process(synthetic_data_dir, tmp_path / "straight", overrides)
    resumed = stopped_and_resumed(synthetic_data_dir, tmp_path / "resumed", overrides, stop_after=1)
    weights = straight["state_dict"]
    # The norm's own parameters (and, for batch, its running statistics) are in the checkpoint, resumed bit for bit.
    assert "network.2.weight" in weights and ("network.2.running_mean" in weights) == (norm == "batch")
    assert all(torch.equal(weights[key], resumed["state_dict"][key]) for key in weights)


def test_label_smoothing_shapes_the_training_loss_only():
    model = ImageClassifier(MLP(depth=0), (1, 1, 10), 10, label_smoothing=0.1)
    with torch.no_grad():  # logits 10, 0, ..., 0 for every image: confident in class 0, and right
        model.network[1].weight.zero_()
        model.network[1].bias.copy_(torch.tensor([10.0] + [0.0] * 9))
    batch = (torch.zeros(4, 1, 1, 10, dtype=torch.uint8), torch.zeros(4, dtype=torch.long))
    # Smoothed: 0.9 of the target on class 0, 0.01 on each class, so the confident answer costs about 0.9.
    assert model._shared_step(batch, "train").item() == pytest.approx(0.90041, abs=1e-5)
    assert model._shared_step(batch, "val").item() == pytest.approx(0.00041, abs=1e-5)
    restored = ImageClassifier.from_checkpoint(
        {"hyper_parameters": dict(model.hparams), "state_dict": model.state_dict()}
    )
    assert restored.hparams.label_smoothing == 0.1


def test_ema_validates_checkpoints_and_tests_the_average_and_resumes_exactly(synthetic_data_dir, tmp_path):
    overrides = ["callbacks=ema", "callbacks.ema.decay=0.9", "trainer.deterministic=true"]
    straight = train_in_process(synthetic_data_dir, tmp_path / "straight", overrides)
    best = torch.load(tmp_path / "straight" / "checkpoints" / "best.ckpt", weights_only=True)
    # The checkpoint's weights are the average, the trained ones beside them: what eval and predict load is the average.
    assert not torch.equal(best["state_dict"]["network.1.weight"], best["current_model_state"]["network.1.weight"])
    recorded = json.loads((tmp_path / "straight" / "metrics.json").read_text())
    assert (
        evaluate(tmp_path / "straight" / "checkpoints" / "best.ckpt", synthetic_data_dir, "cpu")["test/acc"]
        == (recorded["test/acc"])
    )
    resumed = stopped_and_resumed(synthetic_data_dir, tmp_path / "resumed", overrides, stop_after=1)
    for part in ("state_dict", "current_model_state"):  # the average and the trained weights, bit for bit
        assert all(torch.equal(straight[part][key], resumed[part][key]) for key in straight[part])


def validation_of(checkpoint, data_dir) -> dict[str, float]:
    """val/* of a checkpoint's state_dict on the validation split it trained with."""
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    return trainer.validate(load_model(checkpoint), datamodule=load_data(checkpoint, data_dir), verbose=False)[0]


@pytest.mark.parametrize("norm", ["none", "batch"])
def test_swa_averages_the_epochs_from_its_start_validates_tests_and_resumes_exactly(norm, synthetic_data_dir, tmp_path):
    # 0.7 of 3 epochs: epochs 2 and 3 are averaged.
    overrides = [
        "callbacks=swa",
        "callbacks.swa.swa_epoch_start=0.7",
        f"model.norm={norm}",
        "trainer.deterministic=true",
    ]
    straight = train_in_process(synthetic_data_dir, tmp_path / "straight", overrides)
    # The same run stopped after each epoch and resumed: its last.ckpt then holds that epoch's trained weights.
    folder, last = tmp_path / "resumed", tmp_path / "resumed" / "checkpoints" / "last.ckpt"
    first = train_in_process(synthetic_data_dir, folder, overrides, stop_after=1)
    # Before the start nothing is averaged: validation and the checkpoint see the trained weights.
    assert all(torch.equal(first["state_dict"][key], first["current_model_state"][key]) for key in first["state_dict"])
    first_validation = validation_of(last, synthetic_data_dir)
    second = train_in_process(synthetic_data_dir, folder, overrides, stop_after=2, resume_from=last)
    resumed = train_in_process(synthetic_data_dir, folder, overrides, resume_from=last)
    for part in ("state_dict", "current_model_state"):  # the average and the trained weights, bit for bit
        assert all(torch.equal(straight[part][key], resumed[part][key]) for key in straight[part])
    # The average is the mean of epoch 2's and epoch 3's trained weights, and of batch norm's statistics (its
    # count of batches too: 20 and 30 give 25).
    epoch_2, epoch_3 = second["current_model_state"], straight["current_model_state"]
    assert ("network.2.running_mean" in epoch_3) == (norm == "batch")
    for key, average in straight["state_dict"].items():
        mean = ((epoch_2[key] + epoch_3[key]) / 2).to(average.dtype)
        torch.testing.assert_close(average, mean, rtol=0, atol=1e-7)
    assert not torch.equal(straight["state_dict"]["network.1.weight"], epoch_3["network.1.weight"])
    # Validation measured the trained weights in epoch 1, the average in epoch 3; the test used best.ckpt's.
    recorded = json.loads((tmp_path / "straight" / "metrics.json").read_text())
    assert recorded["history"][0]["val/loss"] == pytest.approx(first_validation["val/loss"], abs=1e-6)
    averaged = validation_of(tmp_path / "straight" / "checkpoints" / "last.ckpt", synthetic_data_dir)
    assert recorded["history"][2]["val/loss"] == pytest.approx(averaged["val/loss"], abs=1e-6)
    tested = evaluate(tmp_path / "straight" / "checkpoints" / "best.ckpt", synthetic_data_dir, "cpu")
    assert tested["test/acc"] == recorded["test/acc"]


@pytest.mark.parametrize("start, max_epochs, first", [(0.8, 10, 8), (0.7, 3, 2), (0.05, 10, 1), (3, 10, 3), (1, 1, 1)])
def test_swa_starts_at_an_epoch_or_a_share_of_the_epochs(start, max_epochs, first):
    assert SWAWeights(start).first_epoch(max_epochs) == first


@pytest.mark.parametrize("start", [0, -1, 0.0, 1.0, 1.5, -0.5, True, "late", None])
def test_swa_refuses_a_start_that_is_no_epoch_or_share(start):
    with pytest.raises(SettingError, match=r"swa_epoch_start must be a share .* \(an integer >= 1\), got"):
        SWAWeights(start)


def test_swa_refuses_a_start_after_the_last_epoch(synthetic_data_dir, tmp_path):
    with pytest.raises(ConfigError, match=r"swa_epoch_start=4 is after the last epoch \(trainer.max_epochs=3\)"):
        train_in_process(synthetic_data_dir, tmp_path, ["callbacks=swa", "callbacks.swa.swa_epoch_start=4"])


def test_batch_norm_refuses_a_last_batch_of_one_image(synthetic_data_dir, tmp_path):
    # 500 training images (600 less 100 for validation) in batches of 499: the last holds 1.
    with pytest.raises(ConfigError, match=r"data.batch_size=499 leaves a last training batch of 1 image"):
        train_in_process(synthetic_data_dir, tmp_path, ["model.norm=batch", "data.batch_size=499"])
    assert not (tmp_path / "metrics.json").exists()  # refused before the run started
