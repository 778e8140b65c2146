from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from torch import nn

from mlplab.config import ConfigError, parse_run_config
from mlplab.network import build_mlp
from mlplab.train import CONFIG_DIR


def composed(*overrides: str) -> dict:
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return OmegaConf.to_container(compose("train", overrides=list(overrides)), resolve=True)


def parsed(*overrides: str):
    return parse_run_config(composed(*overrides))


def test_defaults():
    config = parsed()
    assert (config.model.depth, config.model.width, config.model.activation) == (2, 512, "relu")
    assert config.data.name == "fashion_mnist" and config.data.batch_size == 128 and config.data.val_size == 5000
    assert config.optimizer.name == "adam" and config.scheduler.name == "none"
    assert config.trainer.max_epochs == 10 and config.seed == 42


def test_data_dir_follows_environment(monkeypatch):
    monkeypatch.setenv("MLPLAB_DATA_DIR", "/somewhere/else")
    assert parsed().data_dir == "/somewhere/else"


def network(*overrides: str) -> nn.Sequential:
    model = parsed(*overrides).model
    return build_mlp(784, 10, model.depth, model.width, model.activation, model.dropout, model.output_activation)


def test_article_preset_has_the_final_relu_and_mlp_does_not():
    article, mlp = network("model=article"), network("model=mlp")
    assert isinstance(article[-1], nn.ReLU) and isinstance(article[-2], nn.Linear)
    assert isinstance(mlp[-1], nn.Linear)
    assert [type(m) for m in article][:-1] == [type(m) for m in mlp]


def test_linear_preset_has_no_hidden_layer():
    assert [type(m) for m in network("model=linear")] == [nn.Flatten, nn.Linear]


@pytest.mark.parametrize("path", sorted((Path(CONFIG_DIR) / "experiment").glob("*.yaml")), ids=lambda p: p.stem)
def test_every_experiment_preset_composes_and_validates(path):
    assert parsed(f"experiment={path.stem}")


@pytest.mark.parametrize("group", ["model", "data", "optimizer", "scheduler", "trainer", "logger", "debug"])
def test_every_option_composes_and_validates(group):
    for path in (Path(CONFIG_DIR) / group).glob("*.yaml"):
        parsed(f"{group}={path.stem}")


def test_list_width_and_sgd_settings_pass():
    config = parsed("model.depth=2", "model.width=[64,32]", "optimizer=sgd", "optimizer.momentum=0.5")
    assert config.model.width == [64, 32] and config.optimizer.momentum == 0.5
    assert isinstance(parsed("optimizer.lr=1").optimizer.lr, float)


@pytest.mark.parametrize(
    "override, names",
    [
        ("model.depth=-1", "model.depth"),
        ("model.width=0", "model.width"),
        ("model.width=abc", "model.width"),
        ("model.width=[64,32,16]", "model.width"),
        ("model.activation=swish", "model.activation"),
        ("model.dropout=1.5", "model.dropout"),
        ("optimizer.lr=-1", "optimizer.lr"),
        ("optimizer.lr=fast", "optimizer.lr"),
        ("data.batch_size=0", "data.batch_size"),
        ("trainer.max_epochs=0", "trainer.max_epochs"),
        ("trainer.precision=8", "trainer.precision"),
        ("trainer.accelerator=tpu", "trainer.accelerator"),
        ("+model.depht=3", "model.depht"),
        ("+learning_rate=3", "learning_rate"),
        ("seed=-3", "seed"),
    ],
)
def test_bad_values_name_the_key_and_what_is_allowed(override, names):
    with pytest.raises(ConfigError) as caught:
        parsed(override)
    message = str(caught.value)
    assert message.startswith(names) and "\n" not in message
    assert any(word in message for word in ("must", "allowed", "give one per"))


def test_job_directory_names_are_one_path_component_of_bounded_length():
    from mlplab.train import job_dirname

    assert job_dirname("model.depth=2,model.width=64") == "model.depth=2,model.width=64"
    assert "/" not in job_dirname("paths.data_dir=/a/b,model.depth=1") and job_dirname("") == "defaults"
    long_a, long_b = "model.width=[" + "512," * 60 + "1]", "model.width=[" + "512," * 60 + "2]"
    assert len(job_dirname(long_a)) <= 150 and job_dirname(long_a) != job_dirname(long_b)
