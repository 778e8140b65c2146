"""A search's Optuna study: the checks before a search writes into it, which trials count and which configurations
are taken, and which process runs which trial, so that a restarted or shared search neither repeats nor loses a
trial. Where the study is kept: ``mlplab.sweeps.storage``.

Any number of mlplab-train processes, on one machine or several, may work on one study. Each trial records its
process (``mlplab.worker``) and renews ``mlplab.alive`` while its job runs; a running trial whose process died (or,
on another host, stopped renewing) is cut short: told failed without an ``error`` (not counted) and queued again
with the same values, so that whoever asks next resumes it.
"""

from __future__ import annotations

import contextlib
import os
import socket
import time
from typing import Any

import optuna
from optuna.distributions import BaseDistribution, CategoricalDistribution, IntDistribution
from optuna.trial import FrozenTrial, TrialState

from mlplab.run.ownership import LEASE_SECONDS, renewed
from mlplab.sweeps.storage import SearchError, StudyAddress

optuna.logging.set_verbosity(optuna.logging.WARNING)  # mlplab prints what a search did; Optuna's INFO repeats it

WORKER = "mlplab.worker"  # "host pid" of the process that asked the trial
ALIVE = "mlplab.alive"  # when that process last said it is still running the trial (seconds since the epoch)
RETRY_OF = "mlplab.retry_of"  # the number of the cut-short trial this one continues
DUPLICATE_OF = "mlplab.duplicate_of"  # set aside: another process proposed the same values first
SPACE = "mlplab.search_space"  # the study's search space, checked when a search opens the study again
CLAIM_GRACE_SECONDS = 3.0  # between asking for a trial and claiming it, a process takes milliseconds


# Opening a study with its checks


def open_study(
    address: StudyAddress, direction: str, space: dict[str, BaseDistribution], sampler: Any = None, pruner: Any = None
) -> optuna.Study:
    """The study, created on first use; an existing one must have the same direction and search space (SearchError,
    before anything is written into it)."""
    storage = address.open()
    pruner = pruner or optuna.pruners.NopPruner()
    try:
        study = optuna.load_study(study_name=address.name, storage=storage, sampler=sampler, pruner=pruner)
    except KeyError:
        study = optuna.create_study(
            study_name=address.name,
            storage=storage,
            direction=direction,
            sampler=sampler,
            pruner=pruner,
            load_if_exists=True,
        )
    _check_direction(study, direction, address)
    recorded = _recorded_space(study)
    if recorded:
        _check_space(recorded, space, address)
    if SPACE not in study.user_attrs:
        study.set_user_attr(SPACE, {name: optuna.distributions.distribution_to_json(d) for name, d in space.items()})
    return study


def load_study(address: StudyAddress, pruner: Any = None) -> optuna.Study:
    """The study as it is, for a job's reports and for summaries."""
    return optuna.load_study(
        study_name=address.name, storage=address.open(), pruner=pruner or optuna.pruners.NopPruner()
    )


def _check_direction(study: optuna.Study, direction: str, address: StudyAddress) -> None:
    existing = study.direction.name.lower()
    if existing != direction:
        raise SearchError(
            f"study {address.name!r} in {address.shown} exists and is to {existing} its objective, not "
            f"to {direction}; use hydra.sweeper.direction={existing}, or another hydra.sweeper.study_name"
        )


def _recorded_space(study: optuna.Study) -> dict[str, BaseDistribution]:
    """The space a study was searched over: recorded by mlplab, or (a study of an earlier version) its trials'."""
    recorded = study.user_attrs.get(SPACE)
    if recorded:
        return {name: optuna.distributions.json_to_distribution(text) for name, text in recorded.items()}
    space: dict[str, BaseDistribution] = {}
    for trial in study.get_trials(deepcopy=False):
        space.update(trial.distributions)
    return space


def _check_space(
    recorded: dict[str, BaseDistribution], space: dict[str, BaseDistribution], address: StudyAddress
) -> None:
    differences = [
        f"{name} (was {sweep_syntax(recorded[name])}, now {sweep_syntax(space[name])})"
        for name in recorded.keys() & space.keys()
        if recorded[name] != space[name]
    ]
    differences += [f"{name} (searched before, not now)" for name in recorded.keys() - space.keys()]
    differences += [f"{name} (new)" for name in space.keys() - recorded.keys()]
    if differences:
        raise SearchError(
            f"study {address.name!r} in {address.shown} was searched over another space: "
            f"{'; '.join(sorted(differences))}; search the same space, or use another "
            "hydra.sweeper.study_name"
        )


def sweep_syntax(distribution: BaseDistribution) -> str:
    """A distribution as it is written in a sweep: choice(...), range(a, b), interval(a, b), tag(log, ...)."""
    if isinstance(distribution, CategoricalDistribution):
        return f"choice({', '.join(map(str, distribution.choices))})"
    if isinstance(distribution, IntDistribution) and not distribution.log:
        return f"range({distribution.low}, {distribution.high + 1}, {distribution.step})"
    text = f"interval({distribution.low}, {distribution.high})"
    return f"tag(log, {text})" if getattr(distribution, "log", False) else text


# Which trials count, and which are taken


def counted(study: optuna.Study) -> list[FrozenTrial]:
    """Trials that count towards ``n_trials``: completed, pruned, and failed for a reason (``error``); not those
    cut short by a crash or set aside as duplicates."""
    finished = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED))
    return finished + failed_trials(study)


def failed_trials(study: optuna.Study) -> list[FrozenTrial]:
    """Trials whose job failed, diverged or had an invalid config (the sweeper records why, as ``error``)."""
    return [
        trial for trial in study.get_trials(deepcopy=False, states=(TrialState.FAIL,)) if "error" in trial.user_attrs
    ]


def configuration(params: dict[str, Any]) -> tuple:
    return tuple(sorted(params.items()))


def taken(study: optuna.Study, but: int | None = None) -> dict[tuple, int]:
    """The configurations of the study's counted, running and queued trials (but trial ``but``), each with the
    lowest trial number that has it."""
    trials = sorted(study.get_trials(deepcopy=False), key=lambda t: t.number)
    params = {trial.number: trial.params for trial in trials}
    configurations: dict[tuple, int] = {}
    for trial in trials:
        if trial.number == but:
            continue
        if trial.state in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING) or "error" in trial.user_attrs:
            configurations.setdefault(configuration(trial.params), trial.number)
        elif trial.state == TrialState.WAITING and RETRY_OF in trial.user_attrs:  # queued: the values it retries
            configurations.setdefault(configuration(params.get(trial.user_attrs[RETRY_OF], {})), trial.number)
    return configurations


def duplicate_of(study: optuna.Study, trial: optuna.trial.BaseTrial) -> int | None:
    """A trial with a lower number and the same values: two processes proposed them at the same moment; the
    later-numbered one gives way."""
    first = taken(study, but=trial.number).get(configuration(trial.params))
    return first if first is not None and first < trial.number else None


# Who runs which trial


def _this_worker() -> str:
    return f"{socket.gethostname()} {os.getpid()}"


def mark_running(trial: optuna.trial.Trial) -> None:
    """Record that this process runs the trial."""
    trial.set_user_attr(WORKER, _this_worker())
    trial.set_user_attr(ALIVE, time.time())


def others_running(study: optuna.Study) -> list[FrozenTrial]:
    """Trials other processes are running now."""
    return [trial for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)) if not _stale(trial)]


def _stale(trial: FrozenTrial) -> bool:
    """Whether the process that claimed the trial is gone: a dead process on this host, or a holder elsewhere that
    stopped renewing its claim. A trial not claimed (yet) is not stale: see ``retry_cut_short``."""
    worker = trial.user_attrs.get(WORKER)
    if not worker:
        return False
    host, _, pid = worker.rpartition(" ")
    if host == socket.gethostname():
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            pass
    return time.time() - float(trial.user_attrs.get(ALIVE, 0)) > LEASE_SECONDS


def retry_cut_short(study: optuna.Study) -> list[int]:
    """Trials whose process died: told failed (no ``error``: not counted) and queued again with the same values, so
    that the next ask resumes them in their job folder. Returns their numbers.

    A trial is claimed just after it is asked; one still unclaimed after ``CLAIM_GRACE_SECONDS`` was cut short
    in between, or asked by an earlier version of mlplab (which ran one search per folder)."""
    running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    cut_short = [trial for trial in running if _stale(trial)]
    unclaimed = {trial.number for trial in running if WORKER not in trial.user_attrs}
    if unclaimed:
        time.sleep(CLAIM_GRACE_SECONDS)
        cut_short += [
            trial
            for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
            if trial.number in unclaimed and WORKER not in trial.user_attrs
        ]
    for trial in cut_short:
        study.tell(trial.number, state=TrialState.FAIL, skip_if_finished=True)
        study.enqueue_trial(trial.params, user_attrs={RETRY_OF: trial.number})
    return [trial.number for trial in cut_short]


def kept_alive(trials: list[optuna.trial.Trial]) -> contextlib.AbstractContextManager:
    """Renew the trials' ``mlplab.alive`` while the block runs their jobs."""
    return renewed(lambda: [trial.set_user_attr(ALIVE, time.time()) for trial in trials], "the search's running trials")
