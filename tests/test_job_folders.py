"""A sweep job's folder (named by its overrides: seed=1,trainer=cpu) as an argument, pasted as mlplab prints it."""

from __future__ import annotations

import json
import re
import shlex

import pytest
from conftest import SYNTHETIC_RUN, run_cli

from mlplab.cli.command_line import paths_as_values
from mlplab.cli.compose import job_dirname


@pytest.mark.slow
def test_the_summarys_eval_command_evaluates_the_job_as_pasted(forked_cli, synthetic_data_dir, tmp_path):
    data = f"paths.data_dir={synthetic_data_dir}"
    sweep = ["-m", "seed=1,2", *SYNTHETIC_RUN, "trainer.limit_test_batches=1", data, "hydra.sweep.dir=sweep"]
    code, output = forked_cli.run(sweep, tmp_path)
    assert code == 0, output[-3000:]
    commands = re.findall(r"^mlplab-eval run=.*$", (tmp_path / "sweep" / "summary.md").read_text(), re.MULTILINE)
    assert len(commands) == 2
    assert all(command.startswith("mlplab-eval run=sweep/seed=") for command in commands)  # from where it ran
    tool, *args = shlex.split(commands[0])
    code, output = forked_cli.run([*args, data, "format=json"], tmp_path, tool=tool)
    assert code == 0, output[-3000:]
    report = json.loads(output[output.index("{") :])
    assert report["run"] == args[0].removeprefix("run=")
    assert 0 <= report["test/acc"] <= 1
    # The job tested on one batch of 50 images, eval on all 200: the report says why the numbers differ.
    assert "trainer.limit_test_batches=1" in report["note"]
    assert "Traceback" not in output and "LeafSpec" not in output and "Tip:" not in output

    # The end-of-job line of the job's log gives the same folder.
    job_log = next((tmp_path / args[0].removeprefix("run=")).glob("*.log")).read_text()
    assert f"Evaluate:      mlplab-eval run={tmp_path / args[0].removeprefix('run=')}" in job_log


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


# A retrain's fixed settings, as a search's choice gives them (docs/regularised-retrain), on the synthetic data.
RETRAIN = [
    "model.depth=2",
    "model.width=[64,32]",
    "model.dropout=0.2741289570473108",
    "label_smoothing=0.040929726807568505",
    "optimizer=adamw",
    "optimizer.lr=0.0011836",
    "optimizer.weight_decay=0.0003",
]
# Hydra's override_dirname of its job with seed 12: sorted, joined by ","
SEED_12 = (
    "data.batch_size=50,data.val_size=100,label_smoothing=0.040929726807568505,model.depth=2,"
    "model.dropout=0.2741289570473108,model.width=[64,32],optimizer.lr=0.0011836,optimizer.weight_decay=0.0003,"
    "optimizer=adamw,seed=12,trainer.max_epochs=1,trainer=cpu"
)


def test_a_job_folder_names_the_sweeps_keys_first(tmp_path):
    assert job_dirname(SEED_12) == (  # as mlplab named it before: the seed cut away
        "data.batch_size=50,data.val_size=100,label_smoothing=0.040929726807568505,model.depth=2,"
        "model.dropout=0.2741289570473108,model.width=[64,32]~679a1984"
    )
    assert job_dirname(SEED_12, str(tmp_path), "seed") == (
        "seed=12,data.batch_size=50,data.val_size=100,label_smoothing=0.040929726807568505,model.depth=2,"
        "model.dropout=0.2741289570473108,model.width~679a1984"
    )
    assert job_dirname("a=[1,2],b='x,y',seed=3", str(tmp_path), "b seed") == "b='x,y',seed=3,a=[1,2]"
    # a folder that holds the job keeps its name, in whichever order an earlier command named it
    (tmp_path / "seed=2,model.width=64").mkdir()
    assert job_dirname("model.width=64,seed=2", str(tmp_path), "model.width") == "seed=2,model.width=64"
    assert job_dirname("model.width=64,seed=2", str(tmp_path), "") == "seed=2,model.width=64"
    assert job_dirname("model.width=64,seed=3", str(tmp_path), "model.width") == "model.width=64,seed=3"


def test_a_retrains_folders_lead_with_the_seed_and_a_folder_named_before_is_found(synthetic_data_dir, tmp_path):
    sweep_dir = tmp_path / "outputs" / "sweeps" / "retrain"
    before = sweep_dir / job_dirname(SEED_12)  # seed 12's job, trained by an earlier version
    before.mkdir(parents=True)
    (before / "metrics.json").write_text(json.dumps({"status": "completed"}))
    args = ["mlplab-train", "-m", *SYNTHETIC_RUN, *RETRAIN, "seed=11,12,13", "sweep=retrain", "dry_run=true"]
    result = run_cli(args, tmp_path, synthetic_data_dir)
    assert result.returncode == 0, result.stderr[-2000:]
    assert [line for line in result.stdout.splitlines() if line.startswith("  #")] == [
        "  #0 to run  seed=11,data.batch_size=50,data.val_size=100,label_smoothing=0.040929726807568505,model.depth=2,"
        "model.dropout=0.2741289570473108,model.width~4b0a1b32",
        "  #1 done    data.batch_size=50,data.val_size=100,label_smoothing=0.040929726807568505,model.depth=2,"
        "model.dropout=0.2741289570473108,model.width=[64,32]~679a1984",
        "  #2 to run  seed=13,data.batch_size=50,data.val_size=100,label_smoothing=0.040929726807568505,model.depth=2,"
        "model.dropout=0.2741289570473108,model.width~d2745dc0",
    ]
