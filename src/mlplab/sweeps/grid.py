"""Grid sweeps: every combination of the sweep's values is a job; each job's config composed once.

Hydra's composition of a job (defaults list, every YAML file) costs ~0.1 s; jobs that differ from a composed one
only in values are derived from it instead (~6 ms).
"""

from __future__ import annotations

import copy
import itertools
import logging
import time
from pathlib import Path
from typing import Any, NamedTuple

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override, OverrideType
from omegaconf import DictConfig, OmegaConf

from mlplab.compat import derive_job_config
from mlplab.errors import MlplabError
from mlplab.sweeps.jobs import job_state

log = logging.getLogger(__name__)


class SweepError(MlplabError):
    """A sweep that cannot run as given."""


class Job(NamedTuple):  # not a dataclass: Hydra's plugin scan runs its modules outside sys.modules
    overrides: list[str]
    dir: Path


def job_folder(config: Any) -> Path:
    """A sweep job's folder, from its composed config (hydra.sweep.dir and .subdir, as Hydra makes it)."""
    return Path(config.hydra.sweep.dir) / str(OmegaConf.select(config, "hydra.sweep.subdir"))


def grid_jobs(overrides: list[Override]) -> list[list[str]]:
    """Each job's overrides: one per combination of the sweep's values (``a=1,2 b=x,y``: four jobs)."""
    choices: dict[str, list[str]] = {}
    for override in overrides:
        key = override.get_key_element()
        if not override.is_sweep_override():
            choices[key] = [f"{key}={override.get_value_element_as_str()}"]
        elif override.is_discrete_sweep():
            choices[key] = [f"{key}={value}" for value in override.sweep_string_iterator()]
        else:
            raise SweepError(
                f"{override.input_line}: a grid sweep takes lists of values (a,b or choice(a, b) or "
                "range(a, b)); interval(...) needs a search (hydra/sweeper=optuna)"
            )
    return [list(job) for job in itertools.product(*choices.values())]


def sweep_overrides(params: dict[str, Any] | None, arguments: list[str]) -> list[str]:
    """``hydra.sweeper.params`` as overrides, then the command line's (which win for a key both set)."""
    return [f"{key}={value}" for key, value in (params or {}).items()] + list(arguments)


def varied_keys(params: dict[str, Any] | None, arguments: list[str], seeds_per_trial: Any = 1) -> list[str]:
    """The keys a sweep varies, in the order given: those its ``hydra.sweeper.params`` or command line sweep
    (``a=1,2``, ``choice(...)``, ``range(...)``, ``interval(...)``), and ``seed`` when a search gives each trial
    several seeds."""
    lines = OverridesParser.create().parse_overrides(sweep_overrides(params, arguments))
    keys = [line.key_or_group for line in lines if line.is_sweep_override()]
    several_seeds = isinstance(seeds_per_trial, int) and seeds_per_trial > 1
    return list(dict.fromkeys(keys + (["seed"] if several_seeds else [])))


class ComposedOnce:
    """A config loader that hands the launcher the job configs the sweeper already composed to check them.

    Jobs that differ from a composed one only in plain values (``seed=2``, ``model.width=[256,128]``) are derived
    from it: a copy with those values set, as Hydra would set them after composing (mlplab.compat's
    derive_job_config). Hydra's full composition (defaults list, every YAML file) costs ~0.1 s a job; only jobs
    that choose other config groups pay it.
    """

    def __init__(self, loader: Any):
        self._loader = loader
        self._composed: dict[tuple[str, ...], DictConfig] = {}
        self._bases: dict[tuple[str, ...], DictConfig] = {}  # untouched copies of composed jobs, by shape
        self._is_group: dict[str, bool] = {}

    def load_sweep_config(self, master_config: DictConfig, sweep_overrides: list[str]) -> DictConfig:
        composed = self._composed.pop(tuple(sweep_overrides), None)
        return composed if composed is not None else self.compose(master_config, sweep_overrides)

    def compose(self, master_config: DictConfig, sweep_overrides: list[str], keep: bool = False) -> DictConfig:
        """Compose a job's config; with ``keep``, the launcher gets this same object (the sweeper only reads it)."""
        parsed = OverridesParser.create().parse_overrides(list(sweep_overrides))
        shape = self._shape(parsed)
        base = self._bases.get(shape) if shape else None
        if base is not None:
            values = [override for override in parsed if not self._is_config_group(override.key_or_group)]
            composed = derive_job_config(base, master_config, parsed, values)
        else:
            composed = self._loader.load_sweep_config(master_config, list(sweep_overrides))
            if shape:
                self._bases[shape] = copy.deepcopy(composed)
        if keep:
            self._composed[tuple(sweep_overrides)] = composed
        return composed

    def _shape(self, parsed: list[Override]) -> tuple[str, ...] | None:
        """What jobs that can be derived from one another share: their group choices and the keys they set.

        None where a job is not that simple (adds, deletes, dict values, hydra settings): it is composed in full.
        """
        shape = []
        for override in parsed:
            if (
                override.type != OverrideType.CHANGE
                or override.package is not None
                or override.is_hydra_override()
                or override.is_sweep_override()
                or isinstance(override.value(), dict)
            ):
                return None
            shape.append(override.input_line if self._is_config_group(override.key_or_group) else override.key_or_group)
        return tuple(shape)

    def _is_config_group(self, key: str) -> bool:
        if key not in self._is_group:
            self._is_group[key] = bool(self._loader.get_group_options(key))
        return self._is_group[key]

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):  # unpickling (parallel launchers) looks up dunders before _loader exists
            raise AttributeError(name)
        return getattr(self._loader, name)


def wait_for_other_processes(job_dirs: list[Path], poll_seconds: float = 1.0) -> None:
    """Jobs this process skipped because another process holds them: wait for them, so the summary is complete."""
    announced = False
    while running := [job_dir for job_dir in job_dirs if job_state(job_dir) == "running"]:
        if not announced:
            log.info("Waiting for %d jobs that another process is running", len(running))
            announced = True
        time.sleep(poll_seconds)


def dry_run_listing(jobs: list[Job], done: list[Job], sweep_dir: Path) -> str:
    lines = [f"Dry run: {len(jobs)} jobs in {sweep_dir} ({len(done)} done); nothing is trained."]
    for number, job in enumerate(jobs):
        lines.append(f"  #{number} {'done  ' if job in done else 'to run'}  {job.dir.name}")
    return "\n".join(lines)
