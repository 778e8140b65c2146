"""A sweep job's folder (named by its overrides: seed=1,trainer=cpu) as an argument, pasted as mlplab prints it."""

from __future__ import annotations

import json
import re
import shlex

from conftest import SYNTHETIC_RUN

from mlplab.cli.command_line import paths_as_values


def test_the_summarys_eval_command_evaluates_the_job_as_pasted(forked_cli, synthetic_data_dir, tmp_path):
    data = f"paths.data_dir={synthetic_data_dir}"
    sweep = ["-m", "seed=1,2", *SYNTHETIC_RUN, "trainer.limit_test_batches=1", data, "hydra.sweep.dir=sweep"]
    code, output = forked_cli.run(sweep, tmp_path)
    assert code == 0, output[-3000:]
    commands = re.findall(r"^mlplab-eval run=.*$", (tmp_path / "sweep" / "summary.md").read_text(), re.MULTILINE)
    assert len(commands) == 2
    assert all(command.startswith(f"mlplab-eval run={tmp_path}/sweep/") and ",seed=" in command for command in commands)
    tool, *args = shlex.split(commands[0])
    code, output = forked_cli.run([*args, data, "format=json"], tmp_path, tool=tool)
    assert code == 0, output[-3000:]
    report = json.loads(output[output.index("{") :])
    assert report["run"] == args[0].removeprefix("run=")
    assert 0 <= report["test/acc"] <= 1
    # The job tested on one batch of 50 images, eval on all 200: the report says why the numbers differ.
    assert "trainer.limit_test_batches=1" in report["note"]
    assert "Traceback" not in output and "LeafSpec" not in output and "Tip:" not in output

    # The end-of-job line of the job's log gives the same command.
    job_log = next((tmp_path / args[0].removeprefix("run=")).glob("*.log")).read_text()
    assert f"Evaluate:      mlplab-eval run={args[0].removeprefix('run=')}" in job_log


def test_path_values_are_read_as_paths(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", "/home/ada")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "sweep" / "seed=1,trainer=cpu").mkdir(parents=True)
    assert paths_as_values(
        [
            "run=outputs/sweeps/s/seed=1,trainer=cpu",
            "resume=outputs/sweeps/s/seed=2,model.width=[8, 8]",
            "data.path=~/my-images",
            "data.path2=~/kept",
            "run='already quoted'",
            "inputs=[a.png,b.png]",
            "+data.path=~/x",
            "model.width=64",
        ]
    ) == [
        "run='outputs/sweeps/s/seed=1,trainer=cpu'",
        "resume='outputs/sweeps/s/seed=2,model.width=[8, 8]'",
        "data.path='/home/ada/my-images'",
        "data.path2=~/kept",
        "run='already quoted'",
        "inputs=[a.png,b.png]",
        "+data.path='/home/ada/x'",
        "model.width=64",
    ]
    # Under -m, commas sweep over paths, unless the value is a folder that exists (a sweep job's).
    assert paths_as_values(["-m", "data.path=a,b", "data.path=sweep/seed=1,trainer=cpu"]) == [
        "-m",
        "data.path=a,b",
        "data.path='sweep/seed=1,trainer=cpu'",
    ]
