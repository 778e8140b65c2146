"""mlplab's Hydra sweeper (``hydra/sweeper=mlplab``, the default of mlplab-train).

Hydra's basic sweeper, plus what makes a sweep usable: every job's config is checked before any job trains, a dry
run lists the jobs, finished jobs are skipped, each job's config is composed once (not once to check and again to
launch), and the sweep folder gets its summary at the end. Works with any launcher (basic, joblib).
"""

from __future__ import annotations

import copy
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any, Callable, NamedTuple, Sequence

from hydra._internal.config_loader_impl import get_overrides_dirname
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override, OverrideType
from hydra.errors import CompactHydraException
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from mlplab.config import ConfigError, describe_config_error, parse_run_config, require_accelerator
from mlplab.report import JOBS_FILE, write_summary
from mlplab.sweep import job_state

log = logging.getLogger(__name__)


class Job(NamedTuple):  # not a dataclass: Hydra's plugin scan runs this module outside sys.modules
    overrides: list[str]
    dir: Path


class ComposedOnce:
    """A config loader that hands the launcher the job configs the sweeper already composed to check them.

    Jobs that differ from a composed one only in plain values (``seed=2``, ``model.width=[256,128]``) are derived
    from it: a copy with those values set, as Hydra would set them after composing. Hydra's full composition
    (defaults list, every YAML file) costs ~0.1 s a job; only jobs that choose other config groups pay it.
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
            if (override.type != OverrideType.CHANGE or override.package is not None or override.is_hydra_override()
                    or override.is_sweep_override() or isinstance(override.value(), dict)):
                return None
            shape.append(override.input_line if self._is_config_group(override.key_or_group) else override.key_or_group)
        return tuple(shape)

    def _is_config_group(self, key: str) -> bool:
        if key not in self._is_group:
            self._is_group[key] = self._loader.repository.group_exists(key)
        return self._is_group[key]

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):  # unpickling (parallel launchers) looks up dunders before _loader exists
            raise AttributeError(name)
        return getattr(self._loader, name)


def derive_job_config(base: DictConfig, master_config: DictConfig, parsed: list[Override], values: list[Override]) -> DictConfig:
    """The config of the job with overrides ``parsed`` from ``base``, a job that chose the same config groups and
    set the same keys; ``values`` are the overrides among ``parsed`` that set a value."""
    config = copy.deepcopy(base)
    for override in values:
        OmegaConf.update(config, override.key_or_group, override.value(), merge=True)
    config.hydra.overrides.task = [override.input_line for override in parsed]
    dirname = config.hydra.job.config.override_dirname
    config.hydra.job.override_dirname = get_overrides_dirname(
        overrides=parsed, exclude_keys=list(dirname.exclude_keys), item_sep=dirname.item_sep, kv_sep=dirname.kv_sep)
    OmegaConf.copy_cache(from_config=master_config, to_config=config)  # as Hydra's load_sweep_config does
    return config


class MlplabSweeper(BasicSweeper):
    def __init__(self, max_batch_size: int | None = None, params: dict[str, str] | None = None):
        super().__init__(max_batch_size=max_batch_size, params=params)

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.loader = ComposedOnce(hydra_context.config_loader)
        context = HydraContext(config_loader=self.loader, callbacks=hydra_context.callbacks)
        super().setup(hydra_context=context, task_function=task_function, config=config)

    def sweep(self, arguments: list[str]) -> Any:
        assert self.config is not None and self.launcher is not None
        parser = OverridesParser.create(config_loader=self.loader)
        overrides = parser.parse_overrides([*self._parse_config(), *arguments])
        sweep_dir = Path(self.config.hydra.sweep.dir)  # resolved (and cached) before any job copies the cache
        jobs = [self.check(job_overrides) for batch in self.split_arguments(overrides, None) for job_overrides in batch]
        done = [job for job in jobs if job_state(job.dir) == "completed"]
        if self.config.get("dry_run"):
            print(dry_run_listing(jobs, done, sweep_dir))
            return []
        sweep_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(self.config, sweep_dir / "multirun.yaml")
        listing = [{"overrides": job.overrides, "dir": job.dir.name} for job in jobs]
        (sweep_dir / JOBS_FILE).write_text(json.dumps(listing, indent=1) + "\n")
        todo = [job for job in jobs if job not in done]
        log.info("Sweep %s: %d jobs, %d done already, %d to run", sweep_dir, len(jobs), len(done), len(todo))
        log.info("Resume or extend it with the same command and sweep=%s", sweep_dir.name)
        returns, batch_size = [], self.max_batch_size or max(len(todo), 1)
        for start in range(0, len(todo), batch_size):
            batch = todo[start:start + batch_size]
            returns.append(self.launcher.launch([job.overrides for job in batch], initial_job_idx=start))
        wait_for_other_processes([job.dir for job in jobs])
        jobs_summary, text = write_summary(sweep_dir)
        print(text, end="")
        print(f"Summary: {sweep_dir / 'summary.md'} (also .csv, .png); TensorBoard: tensorboard --logdir {sweep_dir}")
        unfinished = [job for job in jobs_summary if job["status"] != "completed"]
        if unfinished:
            print(f"mlplab-train: {len(unfinished)} of {len(jobs_summary)} jobs did not complete: "
                  + ", ".join(f"{job['job']} ({job['status']})" for job in unfinished), file=sys.stderr)
            sys.exit(1)
        return returns

    def check(self, job_overrides: Sequence[str]) -> Job:
        """Compose one job's config and check it as the job will; a bad point stops the sweep before any training."""
        try:
            config = checked_job_config(lambda overrides: self.loader.compose(self.config, overrides, keep=True),
                                        list(job_overrides))
        except ConfigError as error:
            print(f"mlplab-train: error: job {' '.join(job_overrides)}: {error}; no job was started", file=sys.stderr)
            sys.exit(2)
        return Job(list(job_overrides), Path(config.hydra.sweep.dir) / str(OmegaConf.select(config, "hydra.sweep.subdir")))


def checked_job_config(compose: Callable[[list[str]], DictConfig], overrides: list[str]) -> DictConfig:
    """``compose(overrides)``, checked as the job will check it; raises ConfigError (one line) if it would fail."""
    try:
        config = compose(overrides)
        run_keys = [key for key in config if key != "hydra"]
        run_config = parse_run_config(OmegaConf.to_container(OmegaConf.masked_copy(config, run_keys), resolve=True))
    except (CompactHydraException, OmegaConfBaseException) as error:
        raise ConfigError(describe_config_error(error)) from None
    require_accelerator(run_config.trainer.accelerator, "trainer.accelerator", "use trainer=cpu or trainer=auto")
    return config


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
