"""Hyperparameter search with Optuna: the search space from Hydra's sweep syntax, each trial's report of its epochs
(for pruning) from inside its own job, and the search's part of the sweep summary. Where the study is kept:
``mlplab.sweeps.storage``; which trials count and who runs which: ``mlplab.sweeps.study``."""

from __future__ import annotations

import copy
import math
import shlex
from collections.abc import Callable
from pathlib import Path
from typing import Any

import optuna
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import ChoiceSweep, IntervalSweep, Override, RangeSweep
from lightning.pytorch import Callback, LightningModule, Trainer
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import TrialState
from typing_extensions import override

from mlplab.run.config import COMMAND_KEYS
from mlplab.run.train import Pruned
from mlplab.sweeps.digits import significant
from mlplab.sweeps.storage import SearchError, StudyAddress
from mlplab.sweeps.study import DUPLICATE_OF, RETRY_OF, counted, load_study


def search_space(overrides: list[Override]) -> dict[str, BaseDistribution]:
    """Optuna distributions for the sweep overrides: ``choice(...)`` or ``a,b,c`` (categorical), ``range(a, b)``
    (integers), ``interval(a, b)`` (floats, or integers when both ends are), ``tag(log, interval(a, b))``
    (log scale)."""
    space: dict[str, BaseDistribution] = {}
    for item in overrides:
        value, key = item.value(), item.get_key_element()
        if isinstance(value, ChoiceSweep):
            space[key] = CategoricalDistribution(list(value.list))
        elif isinstance(value, RangeSweep):
            values = list(item.sweep_iterator())
            step = values[1] - values[0] if len(values) > 1 else 1
            if all(isinstance(v, int) for v in values):
                space[key] = IntDistribution(values[0], values[-1], step=step)
            else:
                space[key] = CategoricalDistribution(values)
        elif isinstance(value, IntervalSweep):
            log = "log" in value.tags
            if isinstance(value.start, int) and isinstance(value.end, int):
                space[key] = IntDistribution(value.start, value.end, log=log)
            else:
                space[key] = FloatDistribution(float(value.start), float(value.end), log=log)
        else:
            raise SearchError(
                f"{key}: {item.input_line} is not a search dimension; use choice(...), range(a, b) or "
                "interval(a, b) (tag(log, interval(a, b)) for a log scale)"
            )
    return space


def parse_params(params: dict[str, Any] | None, arguments: list[str]) -> tuple[list[str], dict[str, BaseDistribution]]:
    """(fixed overrides, search space) from ``hydra.sweeper.params`` and the command line (which wins)."""
    lines = [f"{key}={value}" for key, value in (params or {}).items()] + list(arguments)
    overrides = {item.get_key_element(): item for item in OverridesParser.create().parse_overrides(lines)}
    fixed = [item.input_line for item in overrides.values() if not item.is_sweep_override()]
    return fixed, search_space([item for item in overrides.values() if item.is_sweep_override()])


def as_override(key: str, value: Any) -> str:
    """A sampled value as a command-line override; floats written exactly."""
    return f"{key}={value!r}" if isinstance(value, float) else f"{key}={value}"


def trial_callback(
    address: StudyAddress, number: int, metric: str, pruner: Any, seed: int, seeds_per_trial: int = 1
) -> Callback:
    """The callback a trial's job trains with: reports ``metric`` after each validation, stops when pruned.
    ``seed``: the job's; ``seeds_per_trial``: how many seeds the trial trains (hydra.sweeper.seeds_per_trial)."""
    storage = address.open()
    study = optuna.load_study(study_name=address.name, storage=storage, pruner=pruner or optuna.pruners.NopPruner())
    trial_id = storage.get_trial_id_from_study_id_trial_number(storage.get_study_id_from_name(address.name), number)
    return ReportToStudy(study, storage, trial_id, metric, seed, seeds_per_trial)


SEED_CURVE = "mlplab.curve.seed="  # + a seed: that seed's metric after each epoch, {"epoch": value}
PRUNED_AFTER = "mlplab.pruned"  # why one of the trial's seeds was pruned: the others stop too


class ReportToStudy(Callback):
    """Tells the study the metric of each epoch, through its shared storage (so parallel trials see each other), and
    ends the run (``Pruned``) when the study's pruner finds it clearly worse than the others at the same epoch.

    A trial of several seeds (hydra.sweeper.seeds_per_trial) reports, at each epoch, the mean of the values its seeds
    have reported for that epoch so far: all of them when they train as one stack (each reports before any is
    judged), those that got there first when they train in parallel or one after another. Each seed's curve is
    kept as a user attribute. A seed is judged on the trial as it stood at the seed's epoch, though faster seeds may
    have reported later ones. When one seed is pruned the trial is, and its other seeds stop at their next epoch
    (or before their first).

    Through the storage and pruner APIs, as ``Trial.report`` and ``Trial.should_prune`` do: the trial was asked
    for in the sweeper's process, and Optuna has no public way to rebuild its ``Trial`` in another.
    """

    def __init__(
        self,
        study: optuna.Study,
        storage: optuna.storages.BaseStorage,
        trial_id: int,
        metric: str,
        seed: int = 0,
        seeds_per_trial: int = 1,
    ):
        self.study, self.storage, self.trial_id, self.metric = study, storage, trial_id, metric
        self.seed, self.seeds_per_trial = seed, seeds_per_trial
        self.curve: dict[str, float] = dict(storage.get_trial(trial_id).user_attrs.get(f"{SEED_CURVE}{seed}", {}))

    def report(self, epoch: int, value: float) -> None:
        """Record this job's ``value`` after ``epoch`` (counted from 1: n_warmup_steps=6 may prune from the 6th)."""
        if self.seeds_per_trial == 1:
            self.storage.set_trial_intermediate_value(self.trial_id, epoch, value)
            return
        self.curve[str(epoch)] = value
        self.storage.set_trial_user_attr(self.trial_id, f"{SEED_CURVE}{self.seed}", self.curve)

    def verdict(self, epoch: int) -> str | None:
        """Why the trial is pruned after ``epoch``, or None; with several seeds, first sets the epoch's value to
        the mean of those its seeds reported."""
        trial = self.storage.get_trial(self.trial_id)
        if PRUNED_AFTER in trial.user_attrs:
            return trial.user_attrs[PRUNED_AFTER]
        if self.seeds_per_trial > 1:
            trial = self._set_epoch_mean(epoch)
        # Optuna's pruners judge a trial's last reported epoch; a faster seed's later epochs are not this one's.
        trial = copy.copy(trial)
        trial.intermediate_values = {step: value for step, value in trial.intermediate_values.items() if step <= epoch}
        if not self.study.pruner.prune(self.study, trial):
            return None
        value = trial.intermediate_values[epoch]
        mean = f" (the mean of {self.seeds_per_trial} seeds' so far)" if self.seeds_per_trial > 1 else ""
        reason = (
            f"pruned after epoch {epoch}: {self.metric} {value:.4f}{mean} is clearly worse than other trials' at "
            "that epoch"
        )
        if self.seeds_per_trial > 1:
            self.storage.set_trial_user_attr(self.trial_id, PRUNED_AFTER, reason)
        return reason

    def _set_epoch_mean(self, epoch: int) -> optuna.trial.FrozenTrial:
        """Set the trial's value at ``epoch`` to the mean of its seeds' values at that epoch, and return the trial.

        Read, then written: another seed's value may arrive in between, and its own write may land before this one.
        So it is written again until a read after the write finds no new value: of seeds writing at once, the last
        write holds them all.
        """
        written = None
        while True:
            trial = self.storage.get_trial(self.trial_id)
            values = {
                key: curve[str(epoch)]
                for key, curve in trial.user_attrs.items()
                if key.startswith(SEED_CURVE) and str(epoch) in curve
            }
            if values == written:
                return trial
            # fsum: the same mean whichever order the storage lists the seeds in
            self.storage.set_trial_intermediate_value(self.trial_id, epoch, math.fsum(values.values()) / len(values))
            written = values

    @override
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.seeds_per_trial > 1:
            reason = self.storage.get_trial(self.trial_id).user_attrs.get(PRUNED_AFTER)
            if reason:
                raise Pruned(reason)

    @override
    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        value = trainer.callback_metrics.get(self.metric)
        if trainer.sanity_checking or value is None:
            return
        epoch = trainer.current_epoch + 1
        self.report(epoch, float(value))
        reason = self.verdict(epoch)
        if reason:
            raise Pruned(reason)


def search_summary(
    sweep_dir: Path,
    address: StudyAddress,
    study: optuna.Study | None = None,
    tied_with: Callable[[str], str] | None = None,
) -> str:
    """Markdown for a search's summary: its distinct trials, the best one and its command; draws ``search.png``.
    ``tied_with``: a job's folder name -> a line on which configurations are tied with that job's (ties.chosen_line)."""
    study = study or load_study(address)
    trials = study.get_trials(deepcopy=False)
    distinct = counted(study)
    states = {state: sum(trial.state == state for trial in distinct) for state in TrialState}
    running = sum(trial.state == TrialState.RUNNING for trial in trials)
    cut_short = [
        t
        for t in trials
        if t.state == TrialState.FAIL and "error" not in t.user_attrs and DUPLICATE_OF not in t.user_attrs
    ]
    retries = {t.user_attrs[RETRY_OF]: t.number for t in trials if RETRY_OF in t.user_attrs}
    duplicates = sum(DUPLICATE_OF in t.user_attrs for t in trials)
    counts = ", ".join(f"{count} {state.name.lower()}" for state, count in states.items() if count)
    line = (
        f"Optuna study `{address.name}` in `{address.shown}`: {len(distinct)} distinct trials"
        + (f" ({counts})" if counts else "")
        + (f", {running} running" if running else "")
        + "."
    )
    if cut_short:
        line += (
            " Cut short and asked again: "
            + ", ".join(
                f"trial {t.number}" + (f" (as trial {retries[t.number]})" if t.number in retries else "")
                for t in cut_short
            )
            + "."
        )
    if duplicates:
        line += f" {duplicates} proposal(s) set aside: another process had proposed the same values first."
    lines = ["", "## Search", "", line, "", f"Watch it live: `{address.dashboard_command()}`", ""]
    complete = [trial for trial in trials if trial.state == TrialState.COMPLETE]
    if complete:
        best = study.best_trial
        overrides = [
            o for o in best.user_attrs.get("overrides", []) if o.lstrip("+~").split("=")[0] not in COMMAND_KEYS
        ]
        seeds = best.user_attrs.get("seed_values")
        where = (
            f"objective {significant(best.value)} ± {significant(best.user_attrs['std'])} (mean ± std of "
            f"{len(seeds)} seeds; its first seed's job: {best.user_attrs.get('job', '')})"
            if seeds
            else f"{best.user_attrs.get('job', '')}, objective {significant(best.value)}"
        )
        tied = tied_with(best.user_attrs.get("job", "")) if tied_with else ""
        lines += [
            f"Best: trial {best.number}, {where}." + (f" {tied}" if tied else ""),
            "",
            "Its command, ready to run:",
            "",
            "```",
            "mlplab-train " + " ".join(map(shlex.quote, overrides)),
            "```",
        ]
    importances = _importances(study)
    if importances:
        lines += [
            "",
            "Parameter importances (fANOVA): " + ", ".join(f"{k} {v:.2f}" for k, v in importances.items()) + ".",
        ]
    _plot(trials, importances, study.direction, sweep_dir / "search.png")
    return "\n".join(lines) + "\n"


def _importances(study: optuna.Study, least: int = 4) -> dict[str, float]:
    """fANOVA importances, once enough trials completed for them to mean something (Optuna says all are equal)."""
    if len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))) < least:
        return {}
    try:
        return optuna.importance.get_param_importances(study)
    except (ValueError, RuntimeError):  # nothing varied
        return {}


def _plot(trials: list[optuna.trial.FrozenTrial], importances: dict[str, float], direction: Any, path: Path) -> None:
    """Optimisation history (each trial's objective, best so far) and parameter importances."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (history, bars) = plt.subplots(1, 2, figsize=(11, 4))
    complete = [trial for trial in trials if trial.state == TrialState.COMPLETE]
    pick = max if direction == optuna.study.StudyDirection.MAXIMIZE else min
    best_so_far, running = [], None
    for trial in complete:
        running = trial.value if running is None else pick(running, trial.value)
        best_so_far.append(running)
    history.plot([t.number for t in complete], [t.value for t in complete], "o", label="completed trial")
    history.step([t.number for t in complete], best_so_far, where="post", label="best so far")
    pruned = [trial for trial in trials if trial.state == TrialState.PRUNED and trial.intermediate_values]
    history.plot(
        [t.number for t in pruned],
        [t.intermediate_values[max(t.intermediate_values)] for t in pruned],
        "x",
        color="grey",
        label="pruned (last reported)",
    )
    history.set(title="optimisation history", xlabel="trial", ylabel="objective")
    history.legend(fontsize=8)
    names = list(importances)[::-1]
    bars.barh(names, [importances[name] for name in names])
    bars.set(title="parameter importances (fANOVA)", xlabel="importance")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
