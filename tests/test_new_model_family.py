"""README "Adding a model": a model family is one module with a Backbone dataclass plus one YAML file. Here both
live outside the package, as a user's own would (a module path as the family, a config dir of the user's)."""

from __future__ import annotations

import json
import subprocess
import textwrap
from pathlib import Path

from conftest import SYNTHETIC_RUN, run_cli

BACKBONE = """
from dataclasses import dataclass

from torch import nn

from mlplab.model.backbones import Backbone


@dataclass(frozen=True)
class TinyConv(Backbone):
    channels: int = 4

    def __post_init__(self) -> None:
        if self.channels < 1:
            raise ValueError(f"channels must be an integer >= 1, got {self.channels}")

    def build(self, input_shape, num_classes):
        return nn.Sequential(nn.Conv2d(input_shape[0], self.channels, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(4),
                             nn.Flatten(), nn.Linear(self.channels * 16, num_classes))
"""


def train(tmp_path: Path, data_dir: Path, *overrides: str) -> subprocess.CompletedProcess:
    """mlplab-train with the user's config dir and their own code importable (as on PYTHONPATH)."""
    args = ["mlplab-train", "--config-dir", str(tmp_path / "conf"), *SYNTHETIC_RUN, "model=tiny_conv", *overrides]
    return run_cli(args, tmp_path, data_dir, python_path=[tmp_path / "code"])


def test_a_backbone_module_and_a_yaml_file_make_a_model_family(synthetic_data_dir, tmp_path):
    (tmp_path / "code").mkdir()
    (tmp_path / "code" / "tiny_conv.py").write_text(textwrap.dedent(BACKBONE))
    (tmp_path / "conf" / "model").mkdir(parents=True)
    (tmp_path / "conf" / "model" / "tiny_conv.yaml").write_text("family: tiny_conv\nchannels: 6\n")
    result = train(tmp_path, synthetic_data_dir)
    # A name without a dot is a family of mlplab's own package, which has none by that name.
    assert result.returncode == 2 and "model.family must be one of cnn, mlp" in result.stderr
    (tmp_path / "conf" / "model" / "tiny_conv.yaml").write_text("family: nowhere.tiny_conv\nchannels: 6\n")
    result = train(tmp_path, synthetic_data_dir)
    assert result.returncode == 2 and "model.family 'nowhere.tiny_conv': cannot import it" in result.stderr
    (tmp_path / "code" / "users").mkdir()
    (tmp_path / "code" / "users" / "__init__.py").write_text("")
    (tmp_path / "code" / "users" / "tiny_conv.py").write_text(textwrap.dedent(BACKBONE))
    (tmp_path / "conf" / "model" / "tiny_conv.yaml").write_text("family: users.tiny_conv\nchannels: 6\n")
    result = train(tmp_path, synthetic_data_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    (run_dir,) = (tmp_path / "outputs" / "runs").iterdir()
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["status"] == "completed" and metrics["num_parameters"] == (1 * 6 * 9 + 6) + (6 * 16 * 10 + 10)
    bad = train(tmp_path, synthetic_data_dir, "model.channels=0")
    assert bad.returncode == 2 and "model.channels must be an integer >= 1, got 0" in bad.stderr
    evaluated = run_cli(
        ["mlplab-eval", f"run={run_dir}", "format=json"], tmp_path, synthetic_data_dir, python_path=[tmp_path / "code"]
    )
    assert evaluated.returncode == 0, evaluated.stderr[-2000:]
    assert json.loads(evaluated.stdout)["test/acc"] == metrics["test/acc"]
