import dataclasses
import importlib
import inspect
import json
import os
import re
import tempfile
from pathlib import Path

import pytest
from conftest import SYNTHETIC_RUN, composed
from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st
from omegaconf import OmegaConf
from torch import nn

from mlplab.cli.compose import CONFIG_DIR
from mlplab.errors import SettingError
from mlplab.run.config import ConfigError, parse_run_config


def resolved(*overrides: str) -> dict:
    """The composed config as plain values."""
    return OmegaConf.to_container(composed(overrides), resolve=True)


def parsed(*overrides: str):
    return parse_run_config(resolved(*overrides))


def test_defaults():
    config = parsed()
    assert (config.model.depth, config.model.width, config.model.activation) == (2, 512, "relu")
    assert config.data.name == "fashion_mnist" and config.data.batch_size == 128 and config.data.val_size == 5000
    assert config.optimizer.target == "torch.optim.Adam" and config.scheduler.target is None
    assert config.trainer.max_epochs == 10 and config.seed == 42


def test_data_dir_follows_environment(monkeypatch):
    monkeypatch.setenv("MLPLAB_DATA_DIR", "/somewhere/else")
    assert parsed().data_dir == "/somewhere/else"


def network(*overrides: str) -> nn.Sequential:
    return parsed(*overrides).model.build((1, 28, 28), 10)


def test_article_preset_has_the_final_relu_and_mlp_does_not():
    article, mlp = network("model=article"), network("model=mlp")
    assert isinstance(article[-1], nn.ReLU) and isinstance(article[-2], nn.Linear)
    assert isinstance(mlp[-1], nn.Linear)
    assert [type(m) for m in article][:-1] == [type(m) for m in mlp]


def test_linear_preset_has_no_hidden_layer():
    assert [type(m) for m in network("model=linear")] == [nn.Flatten, nn.Linear]


def own_values(path: Path, group: str) -> dict[str, object]:
    """The values a YAML file sets itself (not through its defaults list), as dotted keys of the whole config."""
    text = path.read_text()
    values = OmegaConf.to_container(OmegaConf.load(path))
    values.pop("defaults", None)
    flat: dict[str, object] = {}

    def walk(prefix: str, node: object) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                walk(f"{prefix}.{key}" if prefix else key, value)
        else:
            flat[prefix] = node

    walk("" if "@package _global_" in text else group, values)
    return flat


def setting(config, dotted: str):
    group, _, key = dotted.partition(".")
    if group in ("optimizer", "scheduler"):  # a class path and its arguments, as the config writes them
        return getattr(config, group).as_dict()[key]
    if group == "trainer" and key in config.trainer.options:  # a Lightning argument mlplab passes on as given
        return config.trainer.options[key]
    value = config
    for part in dotted.split("."):
        value = getattr(value, part)
    return value


@pytest.mark.parametrize("path", sorted((Path(CONFIG_DIR) / "experiment").glob("*.yaml")), ids=lambda p: p.stem)
def test_every_experiment_preset_composes_and_sets_its_values(path):
    config = parsed(f"experiment={path.stem}")
    values = own_values(path, "experiment")
    assert values
    for key, value in values.items():
        assert setting(config, key) == value, key


@pytest.mark.parametrize("group", ["model", "data", "optimizer", "scheduler", "trainer", "debug"])
def test_every_option_composes_and_sets_its_values(group):
    paths = sorted((Path(CONFIG_DIR) / group).glob("*.yaml"))
    assert len(paths) >= 1
    needs = {"folder": ["data.path=images"], "tensors": ["data.path=arrays.npz"]}  # a user's data: where it is
    for path in paths:
        if f"{group}/{path.stem}" in BASES:
            continue
        config = parsed(f"{group}={path.stem}", *needs.get(path.stem, []))
        for key, value in own_values(path, group).items():
            if key == "data.path":  # null in the file, given above
                continue
            actual = config.model.as_dict()["family"] if key == "model.family" else setting(config, key)
            assert actual == value, (path.stem, key)


@pytest.mark.parametrize("option", ["tensorboard", "csv", "wandb", "none"])
def test_every_logger_option_is_the_logger_it_names(option):
    logger = composed([f"logger={option}"]).logger
    expected = {"tensorboard": "TensorBoardLogger", "csv": "CSVLogger", "wandb": "WandbLogger"}.get(option)
    assert logger.get("_target_", "").endswith(expected) if expected else not logger


def test_list_width_and_sgd_settings_pass():
    config = parsed("model.depth=2", "model.width=[64,32]", "optimizer=sgd", "optimizer.momentum=0.5")
    assert config.model.width == [64, 32] and config.optimizer.arguments["momentum"] == 0.5
    assert parsed("optimizer.lr=1").optimizer.arguments["lr"] == 1


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
        ("trainer.strategy=fsdp", "trainer.strategy"),
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
    from mlplab.cli.compose import job_dirname

    assert job_dirname("model.depth=2,model.width=64") == "model.depth=2,model.width=64"
    assert "/" not in job_dirname("paths.data_dir=/a/b,model.depth=1") and job_dirname("") == "defaults"
    long_a, long_b = "model.width=[" + "512," * 60 + "1]", "model.width=[" + "512," * 60 + "2]"
    assert len(job_dirname(long_a)) <= 150 and job_dirname(long_a) != job_dirname(long_b)


# --- any value for any key, through the command line: trains, or is refused in one line naming the key --------

USER_KEYS = [
    "model.depth",
    "model.width",
    "model.activation",
    "model.dropout",
    "model.output_activation",
    "optimizer.lr",
    "optimizer.weight_decay",
    "optimizer.momentum",
    "scheduler.eta_min",
    "data.batch_size",
    "data.eval_batch_size",
    "data.val_size",
    "data.split_seed",
    "trainer.max_epochs",
    "trainer.deterministic",
    "trainer.limit_train_batches",
    "trainer.gradient_clip_val",
    "checkpoint.every_n_steps",
    "seed",
    "trainer.precision",
    "trainer.accelerator",
    "trainer.devices",
    "trainer.strategy",
    "trainer.log_every_n_steps",
    "trainer.num_sanity_val_steps",
    "data.name",
    "data.download",
    "trainer.accumulate_grad_batches",
    "trainer.max_time",
    "trainer.val_check_interval",
]
VALUES = st.one_of(  # plausible values as often as wild ones, so that both paths are exercised
    st.integers(0, 8).map(str),
    st.floats(0, 1).map(repr),
    st.integers(-(10**6), 10**6).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.sampled_from(["true", "false", "null", "relu", "gelu", "none", "[]", "[64,32]", "''", "1e-3", "0.5", "${oops}"]),
    st.lists(st.integers(-2, 700), max_size=3).map(lambda items: "[" + ",".join(map(str, items)) + "]"),
    st.text(st.characters(codec="ascii", exclude_categories=["Cc"]), max_size=8),
)


@settings(
    max_examples=int(os.environ.get("MLPLAB_EXAMPLES", "40")),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@pytest.mark.slow
@given(key=st.sampled_from(USER_KEYS), value=VALUES)
def test_any_value_on_the_command_line_trains_or_is_refused_naming_the_key(
    key, value, forked_cli, synthetic_data_dir, tmp_path
):
    # Networks of hundreds of millions of parameters are allowed (they fit in memory) but take minutes a step.
    numbers = [int(n) for n in re.findall(r"\d+", value)]
    assume(not (key == "model.depth" and any(n > 16 for n in numbers)))
    assume(not (key == "model.width" and any(n > 2048 for n in numbers)))
    # Several devices on the CPU is data-parallel training: processes of their own (tests/test_scale_out.py).
    assume(not (key == "trainer.devices" and value.strip().isdigit() and int(value) > 1))
    override = f"{key}={value}"
    cwd = Path(tempfile.mkdtemp(dir=tmp_path))
    code, output = forked_cli.run(
        [
            *SYNTHETIC_RUN,
            f"paths.data_dir={synthetic_data_dir}",
            "trainer.limit_val_batches=1",
            "trainer.limit_test_batches=1",
            "callbacks.model_summary=null",
            "callbacks.model_description=null",
            "callbacks.misclassified=null",
            "+callbacks.one_step._target_=probes.StopAfterOneStep",
            override,
        ],
        cwd,
    )
    event(f"exit code {code}")
    assert "Traceback" not in output, output
    runs = sorted((cwd / "outputs" / "runs").glob("*"))
    if code == 2:  # refused: one line naming the key, and no run directory left behind
        errors = [line for line in output.splitlines() if line.startswith("mlplab-train: error:")]
        assert len(errors) == 1 and key in errors[0], f"{override}: {output}"
        assert runs == [], override
        return
    (run,) = runs
    metrics = json.loads((run / "metrics.json").read_text())
    if code == 1:  # accepted, trained, and then the loss blew up (optimizer.lr=1e300): said so, and recorded
        assert metrics["status"] == "diverged" and "mlplab-train: diverged:" in output, f"{override}: {output}"
        return
    assert code == 0 and metrics["status"] == "completed" and metrics["step"] == 1, f"{override}: {output}"


# --- one source per default: every value a config file gives is its dataclass's default, or a choice listed here ---

# What each option file sets on purpose, beyond the defaults of what takes its values (the group's dataclass, or
# the optimizer's or schedule's class). Every other value it gives must be that default.
CHOICES = {
    "model/mlp": {},
    "model/article": {"output_activation": "relu"},
    "model/linear": {"depth": 0},
    "model/cnn": {},
    "data/fashion_mnist": {"system_dir": "/usr/share/datasets/fashion-mnist"},
    "data/mnist": {"name": "mnist"},
    "data/kmnist": {"name": "kmnist"},
    "data/cifar10": {"name": "cifar10"},
    "data/folder": {"name": "folder", "path": "images"},
    "data/tensors": {"name": "tensors", "path": "arrays.npz"},
    "trainer/default": {},
    "trainer/auto": {},
    "trainer/cpu": {"accelerator": "cpu"},
    "trainer/gpu": {"accelerator": "gpu"},
    "trainer/ddp": {"strategy": "ddp", "devices": 2},
    "optimizer/adam": {},
    "optimizer/adamw": {},
    "optimizer/sgd": {"lr": 0.01, "momentum": 0.9},
    "scheduler/none": {},
    "scheduler/cosine": {},
    "scheduler/onecycle": {"interval": "step"},
    "scheduler/plateau": {"patience": 2},
    "scheduler/step": {"step_size": 3},
    "scheduler/warmup_cosine": {"interval": "step"},
}
BASES = ("data/user_base",)  # shared by other options (which are checked), not options of their own


def source_of(option: str, key: str) -> str:
    """The config file that gives ``key`` in an option: its own, or the first in its defaults list that does."""
    path = Path(CONFIG_DIR) / f"{option}.yaml"
    values = OmegaConf.to_container(OmegaConf.load(path))
    if key in values:
        return f"conf/{option}.yaml"
    group = option.split("/")[0]
    for entry in values.get("defaults", []):
        if isinstance(entry, str) and entry != "_self_":
            return source_of(f"{group}/{entry}", key)
    return f"conf/{option}.yaml"


def disagreements(option: str, given: dict, defaults: dict) -> list[str]:
    return [
        f"{source_of(option, key)}: {key} is {given[key]!r}, but its default is {defaults.get(key, '(none)')!r}"
        for key in given
        if given[key] != defaults.get(key, given[key] if key in CHOICES[option] else "(none)")
    ]


def class_defaults(cls: type) -> dict:
    return {
        name: p.default
        for name, p in inspect.signature(cls.__init__).parameters.items()
        if p.default is not inspect.Parameter.empty
    }


def test_every_option_file_is_listed_with_its_choices():
    options = {
        f"{group}/{path.stem}"
        for group in ("model", "data", "trainer", "optimizer", "scheduler")
        for path in (Path(CONFIG_DIR) / group).glob("*.yaml")
    }
    assert options - set(BASES) == set(CHOICES)


@pytest.mark.parametrize("option", sorted(CHOICES))
def test_config_files_give_their_dataclass_defaults(option):
    group, stem = option.split("/")
    needs = [f"data.path={CHOICES[option]['path']}"] if group == "data" and "path" in CHOICES[option] else []
    config = parsed(f"{group}={stem}", *needs)
    section, choices = getattr(config, group), CHOICES[option]
    if group in ("model", "data", "trainer"):
        cls = type(section)
        given = {f.name: getattr(section, f.name) for f in dataclasses.fields(cls) if f.name != "options"}
        defaults = {f.name: getattr(cls(**choices), f.name) for f in dataclasses.fields(cls) if f.name != "options"}
        assert getattr(section, "options", {}) == {}  # no Trainer argument beyond the typed ones
    else:  # a class and its arguments: the class's own defaults, and the settings' (interval, monitor)
        settings_cls = type(section)
        base = settings_cls()
        given = {**section.arguments, **{k: v for k, v in vars(section).items() if k not in ("target", "arguments")}}
        defaults = {
            **class_defaults(_class(section.target)),
            **(base.arguments if section.target == base.target else {}),
            **{k: v for k, v in vars(base).items() if k not in ("target", "arguments")},
            **choices,
        }
    assert not (problems := disagreements(option, given, defaults)), "\n".join(problems)


def _class(target):
    """The class a ``_target_`` names; None (no schedule) takes no arguments."""
    if target is None:
        return type("NoSchedule", (), {})
    module, _, name = target.rpartition(".")
    return getattr(importlib.import_module(module), name)


def test_the_default_run_is_the_dataclasses_defaults(monkeypatch):
    """train() from a notebook with default settings trains what the command line does."""
    monkeypatch.delenv("MLPLAB_DATA_DIR", raising=False)
    from mlplab.data.settings import DATA_DIR, DataSettings
    from mlplab.model.backbones.mlp import MLP
    from mlplab.model.optim import OptimizerSettings, ScheduleSettings
    from mlplab.run.settings import CheckpointSettings, TrainerSettings

    config = parsed()
    # Where Debian's package puts Fashion-MNIST is a fact of this machine's kind, given by the config alone (the
    # Makefile reads it from there); a notebook's DataSettings() looks in the data dir and then downloads.
    system_dir = "/usr/share/datasets/fashion-mnist"
    assert config.model == MLP() and config.trainer == TrainerSettings()
    assert config.data == DataSettings(system_dir=system_dir)
    assert config.optimizer == OptimizerSettings() and config.scheduler == ScheduleSettings()
    assert config.checkpoint == CheckpointSettings() and config.data_dir == DATA_DIR
    assert TrainerSettings().devices == 1 and config.trainer.devices == 1
    assert DataSettings().val_size == 5000 and DataSettings(name="folder", path="x").val_size == 0.1


def test_both_checkpoints_get_the_flags_the_code_gives_its_own():
    from mlplab.run.checkpoints import CHECKPOINT_FLAGS

    callbacks = resolved()["callbacks"]
    assert CHECKPOINT_FLAGS == {"save_top_k": 1, "auto_insert_metric_name": False, "enable_version_counter": False}
    for name, filename in (("model_checkpoint", "best"), ("last_checkpoint", "last")):
        checkpoint = callbacks[name]
        assert checkpoint["_target_"] == "lightning.pytorch.callbacks.ModelCheckpoint"
        assert {key: checkpoint[key] for key in CHECKPOINT_FLAGS} == CHECKPOINT_FLAGS
        assert checkpoint["filename"] == filename


def test_eval_and_predict_share_where_the_data_is_and_write_nothing():
    for tool in ("eval", "predict"):
        cfg = composed(["run=x", *(["inputs=test"] if tool == "predict" else [])], tool, hydra=True)
        assert cfg.paths == composed().paths
        assert cfg.hydra.run.dir == "." and cfg.hydra.output_subdir is None
        assert cfg.hydra.job_logging.handlers.console.stream == "ext://sys.stderr"


# --- errors carry their key ---------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TwoSizes:
    low: int = 1
    high: int = 2

    def __post_init__(self) -> None:
        if self.high < self.low:  # about high, though the sentence starts with another key's name
            raise SettingError("high", f"low is {self.low}, so high must be at least that, got {self.high}")
        if self.low == 0:  # about the pair as a whole
            raise SettingError(None, "high and low must not both be 0")


def test_an_error_is_named_by_the_key_it_carries_not_its_first_word():
    from mlplab.run.config import parse_section

    with pytest.raises(ConfigError) as caught:
        parse_section("sizes", TwoSizes, {"low": 3, "high": 2})
    assert str(caught.value) == "sizes.high: low is 3, so high must be at least that, got 2"
    with pytest.raises(ConfigError) as caught:
        parse_section("sizes", TwoSizes, {"low": 0, "high": 0})
    assert str(caught.value) == "sizes: high and low must not both be 0"
    with pytest.raises(ConfigError) as caught:
        parsed("trainer.devices=0")
    assert str(caught.value) == "trainer.devices must be an integer >= 1 or 'auto', got 0"
    with pytest.raises(ConfigError) as caught:
        parsed("data=folder")
    assert str(caught.value) == "data.path is required with data=folder: data.path=DIR (an image folder)"


@pytest.mark.parametrize(
    "option, cls, choices",
    [
        # The sampler and the pruner are the file's choices (None in code: a grid never builds them); the metric
        # comes from the root's optimized_metric, val/acc by default, as in code.
        ("hydra/sweeper/mlplab", "hydra_plugins.mlplab_sweeper.mlplab_sweeper.MlplabSweeper", {"sampler", "pruner"}),
        ("hydra/launcher/stacked", "hydra_plugins.mlplab_sweeper.stacked_launcher.StackedLauncher", set()),
    ],
)
def test_the_sweepers_and_launchers_files_give_their_classes_defaults(option, cls, choices):
    module, _, name = cls.rpartition(".")
    defaults = class_defaults(getattr(importlib.import_module(module), name))
    given = {
        key: value
        for key, value in OmegaConf.to_container(OmegaConf.load(Path(CONFIG_DIR) / f"{option}.yaml")).items()
        if not key.startswith("_") and key not in choices and key != "metric"
    }
    assert set(given) | choices | {"metric"} >= set(defaults) - {"metric"}
    wrong = [
        f"conf/{option}.yaml: {key} is {value!r}, but its default is {defaults[key]!r}"
        for key, value in given.items()
        if value != defaults.get(key, "(none)")
    ]
    assert wrong == []
    if "metric" in defaults:  # interpolated in the file: resolved, it is the class's default
        assert composed(hydra=True).hydra.sweeper.metric == defaults["metric"] == "val/acc"
