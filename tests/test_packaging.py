"""The wheel: built from the repository, installed away from it, it trains from an empty directory with the
configs it carries, and takes a user's own config directory beside them."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import SYNTHETIC_RUN, cli_env

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_the_wheel_trains_from_an_empty_directory_outside_the_source_tree(synthetic_data_dir, tmp_path):
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--quiet"]
    subprocess.run(
        [*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp_path / "dist"), str(REPO)],
        check=True,
        capture_output=True,
        cwd=tmp_path,
    )
    (wheel,) = (tmp_path / "dist").glob("mlplab-*.whl")
    site = tmp_path / "site"
    subprocess.run([*pip, "install", "--no-deps", "--target", str(site), str(wheel)], check=True, capture_output=True)
    assert not (site / "mlplab" / "cli" / "train.py").resolve().is_relative_to(REPO)
    # The wheel carries the repository's conf/ as mlplab/conf, every file of it, and the source tree no other copy.
    shipped = sorted(str(p.relative_to(site / "mlplab" / "conf")) for p in (site / "mlplab" / "conf").rglob("*.yaml"))
    assert shipped == sorted(str(p.relative_to(REPO / "conf")) for p in (REPO / "conf").rglob("*.yaml"))
    assert "model/mlp.yaml" in shipped and "train.yaml" in shipped
    assert not list((REPO / "src").rglob("*.yaml"))

    work = tmp_path / "empty"
    (work / "mine" / "experiment").mkdir(parents=True)
    # A user's preset in a config directory of their own, used next to the packaged configs.
    (work / "mine" / "experiment" / "narrow.yaml").write_text(
        "# @package _global_\ndefaults:\n  - override /optimizer: sgd\nmodel:\n  width: 24\n"
    )
    env = {**cli_env(synthetic_data_dir), "PYTHONPATH": str(site)}  # the installed copy first, before the checkout's
    where = subprocess.run(
        [sys.executable, "-c", "import mlplab.cli.compose as c; print(c.CONFIG_DIR)"],
        env=env,
        cwd=work,
        capture_output=True,
        text=True,
        check=True,
    )
    assert Path(where.stdout.strip()) == site / "mlplab" / "conf"

    result = subprocess.run(
        [str(site / "bin" / "mlplab-train"), "--config-dir", "mine", "experiment=narrow", *SYNTHETIC_RUN],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    (run_dir,) = (work / "outputs" / "runs").iterdir()
    assert json.loads((run_dir / "metrics.json").read_text())["status"] == "completed"
    config = (run_dir / ".hydra" / "config.yaml").read_text()
    assert "width: 24" in config and "torch.optim.SGD" in config
    assert sorted(os.listdir(work)) == ["mine", "outputs"]


def test_pyproject_lists_every_package_folder():
    """pyproject.toml lists the packages (mlplab.conf lives outside src/); a new folder there must be added."""
    block = re.search(r"\npackages = \[(.*?)\]", (REPO / "pyproject.toml").read_text(), re.DOTALL).group(1)
    listed = re.findall(r'"([\w.]+)"', block)
    code = {".".join(p.parent.relative_to(REPO / "src").parts) for p in (REPO / "src").rglob("__init__.py")}
    configs = {
        ".".join(("mlplab", *p.relative_to(REPO).parts))
        for p in [REPO / "conf", *(REPO / "conf").rglob("*")]
        if p.is_dir() and p.name != "__pycache__"
    }
    assert sorted(listed) == sorted(code | configs)
    assert "mlplab.conf.model" in listed and "hydra_plugins.mlplab_sweeper" in listed
