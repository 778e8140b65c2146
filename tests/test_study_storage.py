"""Where a search's study is kept (hydra.sweeper.storage): SQLite, a journal in one sweep folder shared by two
processes (a real PostgreSQL server shared by two processes, each with its own folder: tests/test_slurm.py, where
they run as the README's SLURM array), refusals that leave an existing study untouched, lightning-hydra-template's
search configs, and optuna-dashboard reading a running search. Searches run as users run them, in subprocesses;
studies are read back with Optuna."""

import csv
import json
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import optuna
import pytest
from conftest import SYNTHETIC_RUN, free_port, postgres_server

from mlplab.sweeps.storage import STUDY_FILE

BIN = Path(sys.executable).parent
SEARCH = ["-m", "hydra/sweeper=optuna", *SYNTHETIC_RUN, "callbacks.model_summary=null"]
SPACE = ["model.width=choice(16, 24, 32)", "optimizer.lr=tag(log, interval(0.0003, 0.01))"]
COMPLETE = (optuna.trial.TrialState.COMPLETE,)


def search(forked_cli, args: list[str], cwd: Path, data_dir: Path) -> tuple[int, str]:
    """mlplab-train's main() in a process forked from one that imported it (conftest.ForkedCli): exit status and
    output."""
    code, output = forked_cli.run([*SEARCH, f"paths.data_dir={data_dir}", *args], cwd)
    assert "Traceback" not in output, output[-3000:]
    return code, output


def jobs_in_summary(sweep_dir: Path) -> list[str]:
    with (sweep_dir / "summary.csv").open() as file:
        return [row["job"] for row in csv.DictReader(file)]


@pytest.mark.slow
def test_two_processes_share_one_sweep_folder_and_its_journal(forked_cli, synthetic_data_dir, tmp_path):
    slow = ["data.batch_size=10", "+callbacks.pace={_target_:probes.PaceSteps,seconds:0.01}"]
    args = [
        *SEARCH,
        f"paths.data_dir={synthetic_data_dir}",
        "hydra.sweeper.n_trials=6",
        "sweep=together",
        *SPACE,
        *slow,
    ]
    for code, _, stderr in forked_cli.run_together([args, args], tmp_path, {}):  # two processes side by side
        assert code == 0 and "Traceback" not in stderr, stderr[-3000:]
    sweep_dir = tmp_path / "outputs" / "sweeps" / "together"
    study = optuna.load_study(
        study_name="together",
        storage=optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(sweep_dir / STUDY_FILE))),
    )
    trials = study.get_trials(states=COMPLETE)
    assert len(trials) == 6 and len(study.get_trials()) == 6
    assert len({tuple(sorted(t.params.items())) for t in trials}) == 6
    assert len({t.user_attrs["mlplab.worker"] for t in trials}) == 2  # both processes ran trials
    assert sorted(jobs_in_summary(sweep_dir)) == sorted(t.user_attrs["job"] for t in trials)


@pytest.mark.slow
def test_a_search_kept_in_sqlite_continues_from_it(forked_cli, synthetic_data_dir, tmp_path):
    url = f"sqlite:///{tmp_path / 'studies.db'}"
    args = [f"hydra.sweeper.storage={url}", "sweep=lite", *SPACE]
    assert search(forked_cli, [*args, "hydra.sweeper.n_trials=1"], tmp_path, synthetic_data_dir)[0] == 0
    first = optuna.load_study(study_name="lite", storage=url).get_trials(states=COMPLETE)
    assert len(first) == 1
    assert search(forked_cli, [*args, "hydra.sweeper.n_trials=2"], tmp_path, synthetic_data_dir)[0] == 0
    trials = optuna.load_study(study_name="lite", storage=url).get_trials(states=COMPLETE)
    assert len(trials) == 2 and trials[0].params == first[0].params and trials[1].params != first[0].params
    sweep_dir = tmp_path / "outputs" / "sweeps" / "lite"
    assert not (sweep_dir / STUDY_FILE).exists() and len(jobs_in_summary(sweep_dir)) == 2
    assert f"in `{url}`: 2 distinct trials" in (sweep_dir / "summary.md").read_text()


@pytest.mark.slow
def test_a_study_that_cannot_be_used_is_refused_with_one_line_and_left_as_it_was(
    forked_cli, synthetic_data_dir, tmp_path
):
    args = ["hydra.sweeper.n_trials=2", "sweep=kept", "model.width=choice(16, 32)"]
    assert search(forked_cli, args, tmp_path, synthetic_data_dir)[0] == 0
    sweep_dir = tmp_path / "outputs" / "sweeps" / "kept"
    journal, folders = (sweep_dir / STUDY_FILE).read_bytes(), sorted(p.name for p in sweep_dir.iterdir())
    refusals = {
        "hydra.sweeper.direction=minimize": "study 'kept' in outputs/sweeps/kept/optuna.journal exists and is to "
        "maximize its objective, not to minimize",
        "model.width=choice(16, 64)": "was searched over another space: model.width (was choice(16, 32), now "
        "choice(16, 64))",
        "optimizer.lr=interval(0.001, 0.01)": "optimizer.lr (new)",
        f"hydra.sweeper.storage=postgresql+psycopg://mlplab@127.0.0.1:{free_port()}/none": (
            "cannot use the database: connection failed"
        ),
        "hydra.sweeper.storage=mysql+pymysql://mlplab@127.0.0.1/none": "the database driver pymysql is not installed",
        "hydra.sweeper.storage=nowhere://x": "unknown kind of database 'nowhere'",
    }
    for change, expected in refusals.items():  # mlplab-train's main() in processes forked from one (conftest)
        code, output = forked_cli.run(
            [*SEARCH, f"paths.data_dir={synthetic_data_dir}", *args, "hydra.sweeper.n_trials=4", change], tmp_path
        )
        errors = [line for line in output.splitlines() if line.startswith("mlplab-train:")]
        assert code == 2 and len(errors) == 1 and expected in errors[0], (change, output[-2000:])
        assert errors[0].startswith("mlplab-train: error: ") and "Traceback" not in output
        assert (sweep_dir / STUDY_FILE).read_bytes() == journal  # nothing written into the study
        assert sorted(p.name for p in sweep_dir.iterdir()) == folders  # nothing trained


@pytest.mark.slow
def test_a_database_password_is_shown_masked_wherever_the_storage_is_shown(forked_cli, synthetic_data_dir, tmp_path):
    # The README keeps the password out of the URL (~/.pgpass); given in it all the same, it is *** in the log and
    # the summary, and in the one line refusing a URL that SQLAlchemy would misread or cannot read at all.
    with postgres_server() as url:  # it trusts every connection: the password is sent, not checked
        given, masked = url.replace("mlplab@", "mlplab:hunter2@"), url.replace("mlplab@", "mlplab:***@")
        args = [f"hydra.sweeper.storage={given}", "sweep=secret", "hydra.sweeper.n_trials=1", *SPACE]
        code, output = search(forked_cli, args, tmp_path, synthetic_data_dir)
        summary = (tmp_path / "outputs" / "sweeps" / "secret" / "summary.md").read_text()
        assert code == 0 and f"in {masked}; watch it live: optuna-dashboard '{masked}'" in output
        assert f"in `{masked}`: 1 distinct trials" in summary
        assert "hunter2" not in output + summary
        port = url.split(":")[-1].split("/")[0]
        refusals = {
            url.replace("mlplab@", "mlplab:hun@ter2@"): "the password holds '@', which a URL must write as %40",
            given.replace(f":{port}/", ":port/"): "not a database URL (invalid literal for int()",
        }
        for storage, expected in refusals.items():
            code, output = forked_cli.run(
                [*SEARCH, f"paths.data_dir={synthetic_data_dir}", f"hydra.sweeper.storage={storage}", *SPACE], tmp_path
            )
            errors = [line for line in output.splitlines() if line.startswith("mlplab-train:")]
            assert code == 2 and len(errors) == 1 and expected in errors[0], (storage, output[-2000:])
            assert "Traceback" not in output and "mlplab:***@" in errors[0] and "ter2" not in output


@pytest.mark.slow
def test_a_search_config_shaped_like_lightning_hydra_templates_runs_as_it_is(forked_cli, synthetic_data_dir, tmp_path):
    # configs/hparams_search/mnist_optuna.yaml of lightning-hydra-template, with mlplab's model keys
    (tmp_path / "conf" / "hparams_search").mkdir(parents=True)
    (tmp_path / "conf" / "hparams_search" / "mnist_optuna.yaml").write_text("""\
# @package _global_
defaults:
  - override /hydra/sweeper: optuna
optimized_metric: "val/acc_best"
hydra:
  mode: "MULTIRUN"
  sweeper:
    _target_: hydra_plugins.hydra_optuna_sweeper.optuna_sweeper.OptunaSweeper
    storage: null
    study_name: null
    n_jobs: 1
    direction: maximize
    n_trials: 3
    max_failure_rate: 0.0
    sampler:
      _target_: optuna.samplers.TPESampler
      seed: 1234
      n_startup_trials: 10
    params:
      optimizer.lr: interval(0.0001, 0.01)
      data.batch_size: choice(32, 64, 128, 256)
      model.width: choice(16, 32, 64)
""")
    own = [arg for arg in SYNTHETIC_RUN if not arg.startswith("data.batch_size")]  # the command line would win
    args = ["--config-dir", "conf", "hparams_search=mnist_optuna", *own, "sweep=lht"]  # no -m: the config's mode
    code, output = forked_cli.run([*args, f"paths.data_dir={synthetic_data_dir}"], tmp_path)
    assert code == 0, output[-3000:]
    sweep_dir = tmp_path / "outputs" / "sweeps" / "lht"
    study = optuna.load_study(
        study_name="lht",
        storage=optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(sweep_dir / STUDY_FILE))),
    )
    trials = study.get_trials(states=COMPLETE)
    assert len(trials) == 3 and set(trials[0].params) == {"optimizer.lr", "data.batch_size", "model.width"}
    for trial in trials:  # the objective: val/acc_best, the best epoch's val/acc
        metrics = json.loads((sweep_dir / trial.user_attrs["job"] / "metrics.json").read_text())
        assert trial.value == metrics["val/acc"]


def test_a_failure_limit_by_the_stable_plugins_name_stops_the_search(forked_cli, synthetic_data_dir, tmp_path):
    code, output = search(
        forked_cli,
        [
            "hydra.sweeper.n_trials=6",
            "optimizer.lr=interval(1e30, 2e30)",
            "sweep=limit",
            "hydra.sweeper.max_failure_rate=0.2",
        ],
        tmp_path,
        synthetic_data_dir,
    )
    (line,) = [line for line in output.splitlines() if line.startswith("mlplab-train: search stopped")]
    assert code == 1 and "2 of 6 trials failed" in line and "max_failure_rate=0.2" in line


@pytest.mark.slow
def test_optuna_dashboard_reads_the_search(forked_cli, synthetic_data_dir, tmp_path):
    dashboard = BIN / "optuna-dashboard"
    if not dashboard.exists() and not shutil.which("optuna-dashboard"):
        pytest.skip("optuna-dashboard is not installed (pip install 'mlplab[dashboard]')")
    code, output = search(
        forked_cli, ["hydra.sweeper.n_trials=2", "sweep=watched", *SPACE], tmp_path, synthetic_data_dir
    )
    assert code == 0
    # the command the search printed, as the user would run it, on a loopback port
    (printed,) = [line for line in output.splitlines() if "watch it live: " in line]
    command = printed.split("watch it live: ")[1].split()
    assert command == ["optuna-dashboard", "outputs/sweeps/watched/optuna.journal"]
    port = free_port()
    server = subprocess.Popen(
        [str(dashboard), *command[1:], "--host", "127.0.0.1", "--port", str(port)],
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        studies = _get_json(f"http://127.0.0.1:{port}/api/studies", wait=60)["study_summaries"]
        (study,) = [s for s in studies if s["study_name"] == "watched"]
        detail = _get_json(f"http://127.0.0.1:{port}/api/studies/{study['study_id']}")
    finally:
        server.terminate()
        server.wait(timeout=30)
    journal = optuna.load_study(
        study_name="watched",
        storage=optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(tmp_path / command[1]))),
    )
    assert [(t["number"], t["state"]) for t in detail["trials"]] == [(0, "Complete"), (1, "Complete")]
    shown = {t["number"]: {p["name"]: p["param_external_value"] for p in t["params"]} for t in detail["trials"]}
    assert shown == {t.number: {k: str(v) for k, v in t.params.items()} for t in journal.get_trials()}


def _get_json(url: str, wait: float = 0) -> dict:
    deadline = time.monotonic() + wait
    while True:
        try:
            with urllib.request.urlopen(url, timeout=10) as response:
                return json.loads(response.read())
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)
