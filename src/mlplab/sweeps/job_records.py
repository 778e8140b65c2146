"""A sweep's job records as its sweep and its report read them: every job with its state, overrides, values and
metrics; any setting's value from the job's own recorded config; and a damaged metrics.json, which a report lists
as unreadable and a sweep starts over.

Hydra records each job in its folder's .hydra/: overrides.yaml (what the job's command line set) and config.yaml
(every setting, defaults included), with the config groups it chose in hydra.yaml. A setting the command line left
out still has a value there: the default the job ran with, which a later default does not change.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from mlplab.errors import one_line
from mlplab.run.records import UnreadableRecordError, read_metrics
from mlplab.sweeps.jobs import FINISHED, UNREADABLE, job_state
from mlplab.sweeps.slurm import scheduler_states

log = logging.getLogger(__name__)

HYDRA_DIR = ".hydra"  # Hydra's record of a job, in its folder
SWEEP_JOBS_FILE = "jobs.json"  # written by the sweeper before the first job: lets a report list jobs not started yet
METRICS = (
    "val/acc",
    "val/loss",
    "best_epoch",
    "test/acc",
    "test/loss",
    "epochs",
    "wall_seconds",
    "num_parameters",
    "stacked_jobs",  # a stacked job's: how many jobs its stack trained together
)
_ABSENT = object()
_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml where installed: a report reads every job's config


def collect_jobs(sweep_dir: Path) -> list[dict[str, Any]]:
    """Every job of the sweep, listed or started, with its state, overrides, values and metrics. A job whose records
    are damaged is listed as unreadable, its error naming the file; the others are summarised as ever."""
    listed = json.loads((sweep_dir / SWEEP_JOBS_FILE).read_text()) if (sweep_dir / SWEEP_JOBS_FILE).is_file() else []
    overrides: dict[Path, list[str] | None] = {sweep_dir / job["dir"]: job["overrides"] for job in listed}
    for record in sorted(sweep_dir.glob(f"*/{HYDRA_DIR}/overrides.yaml")):
        overrides.setdefault(record.parent.parent, None)  # read with the job's other records
    in_queue = scheduler_states(sweep_dir)  # a sweep submitted to SLURM: its jobs still queued or running there
    jobs = [_job(job_dir, job_overrides, in_queue) for job_dir, job_overrides in overrides.items()]
    keys = list(dict.fromkeys(key for job in jobs for key in job["values"]))
    for job in jobs:  # a key a job's command line left out has the value its config recorded: never blank
        missing = [key for key in keys if key not in job["values"]]
        try:
            job["values"].update(recorded_values(Path(job["run_dir"]), missing) if missing else {})
        except UnreadableRecordError as error:
            if job["status"] != UNREADABLE:  # else its first damaged record is the one named
                job.update(status=UNREADABLE, error=one_line(error))
    return jobs


def _job(job_dir: Path, job_overrides: list[str] | None, in_queue: dict[tuple, tuple[str, str]]) -> dict[str, Any]:
    """One job's summary row; ``job_overrides`` None: read from its folder (a job of an earlier command)."""
    job = {"job": job_dir.name, "overrides": job_overrides or [], "history": [], "run_dir": str(job_dir)}
    try:
        job["overrides"] = read_overrides(job_dir) if job_overrides is None else job_overrides
        metrics = read_metrics(job_dir)
    except UnreadableRecordError as error:
        return {**job, "status": UNREADABLE, "values": override_values(job["overrides"]), "error": one_line(error)}
    status, scheduled = job_state(job_dir), {}
    if status not in FINISHED and tuple(job["overrides"]) in in_queue:
        job_id, state = in_queue[tuple(job["overrides"])]
        status = "queued" if state == "PENDING" else state.lower()
        scheduled = {"scheduler": f"SLURM job {job_id}"}
    return {
        **job,
        "status": status,
        **scheduled,
        "values": override_values(job["overrides"]),
        **{key: metrics[key] for key in METRICS if key in metrics},
        **({"seconds": metrics["wall_seconds"] / metrics.get("stacked_jobs", 1)} if "wall_seconds" in metrics else {}),
        "history": metrics.get("history", []),
        "error": metrics.get("error", ""),
    }


def override_values(overrides: list[str]) -> dict[str, str]:
    """``{"model.width": "64"}`` of ``["model.width=64"]``: each override's key (``+``/``~`` dropped) and text."""
    return dict(override.lstrip("+~").partition("=")[::2] for override in overrides)


def read_overrides(job_dir: Path) -> list[str]:
    """The job's overrides (.hydra/overrides.yaml); UnreadableRecordError, naming the file, when it is damaged."""
    path = job_dir / HYDRA_DIR / "overrides.yaml"
    overrides = _read_yaml(path) or []
    if not isinstance(overrides, list):
        raise UnreadableRecordError(path, f"a list of overrides was expected, found {type(overrides).__name__}")
    return [str(override) for override in overrides]


def job_config(job_dir: Path) -> DictConfig | None:
    """The job's config as Hydra recorded it, its chosen config groups under ``hydra.runtime.choices`` as in a
    composed config; None for a job that has not started. UnreadableRecordError when a record is damaged."""
    path = job_dir / HYDRA_DIR / "config.yaml"
    if not path.is_file():
        return None
    config = _read_mapping(path)
    hydra_yaml = path.with_name("hydra.yaml")
    hydra = (_read_mapping(hydra_yaml).get("hydra") or {}) if hydra_yaml.is_file() else {}
    choices = (hydra.get("runtime") or {}).get("choices") or {}
    return OmegaConf.create({**config, "hydra": {"runtime": {"choices": choices}}})


def recorded_values(job_dir: Path, keys: list[str]) -> dict[str, str]:
    """Each of ``keys`` that the job's recorded config has, with its value there (value_text); {} for a job that has
    not started. UnreadableRecordError when a record is damaged."""
    config = job_config(job_dir)
    values = {key: value_text(config, key) for key in keys} if config is not None else {}
    return {key: value for key, value in values.items() if value is not None}


def value_text(config: DictConfig, key: str) -> str | None:
    """``key``'s value in a job's config, written as an override writes it (``0.001``, ``true``, ``[256,128]``), or
    the option a config group chose (``optimizer``: ``adam``); None where the config has no such key."""
    choices = OmegaConf.select(config, "hydra.runtime.choices") or {}
    try:
        value = choices[key] if key in choices else OmegaConf.select(config, key, default=_ABSENT)
        if isinstance(value, (DictConfig, ListConfig)):
            value = OmegaConf.to_container(value, resolve=True)
    except OmegaConfBaseException:  # an interpolation that resolves only inside a running job
        return None
    if value is _ABSENT:
        return None
    if isinstance(value, bool) or value is None:
        return json.dumps(value)  # true, false, null: as Hydra reads them
    return json.dumps(value, separators=(",", ":")) if isinstance(value, (list, dict)) else str(value)


def _read_yaml(path: Path) -> Any:
    """A YAML record; UnreadableRecordError, naming the file and where it stops making sense (the parser's own words
    differ between libyaml and PyYAML)."""
    try:
        return yaml.load(path.read_text(), Loader=_LOADER)
    except UnicodeDecodeError:
        raise UnreadableRecordError(path, "not UTF-8 text") from None
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise UnreadableRecordError(path, f"not readable YAML{where}") from None


def _read_mapping(path: Path) -> dict[str, Any]:
    content = _read_yaml(path)
    if not isinstance(content, dict):
        raise UnreadableRecordError(path, f"a mapping was expected, found {type(content).__name__}")
    return content
