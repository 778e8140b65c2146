"""Proposals for a search that never repeat a configuration of its study, in one process or many.

Optuna's samplers know nothing of configurations already taken: a random or TPE sampler built again with the same
seed (a restarted search, a second machine) replays its first proposals, and on a discrete space any sampler repeats
itself. ``DistinctSampler`` wraps the configured sampler, through Optuna's public sampler interface only.
"""

from __future__ import annotations

import itertools
import math
import random
from collections.abc import Callable, Iterator
from typing import Any

import optuna
from optuna.distributions import BaseDistribution, CategoricalDistribution, IntDistribution
from optuna.samplers import BaseSampler
from optuna.trial import FrozenTrial, TrialState

from mlplab.sweeps.storage import SearchError
from mlplab.sweeps.study import RETRY_OF, configuration, sweep_syntax, taken

GRID_SAMPLER = "optuna.samplers.GridSampler"
PROPOSALS = 20  # the sampler's tries at an untaken configuration before one is drawn from the untaken ones


def values_of(distribution: BaseDistribution) -> list[Any] | None:
    """Every value of a discrete dimension; None for a continuous one."""
    if isinstance(distribution, CategoricalDistribution):
        return list(distribution.choices)
    if isinstance(distribution, IntDistribution):
        return list(range(distribution.low, distribution.high + 1, distribution.step))
    return None


def space_size(space: dict[str, BaseDistribution]) -> int | None:
    """How many configurations a discrete space has; None when a dimension is continuous."""
    sizes = [values_of(distribution) for distribution in space.values()]
    return None if any(values is None for values in sizes) else math.prod(len(values) for values in sizes)


def cells(space: dict[str, BaseDistribution]) -> Iterator[dict[str, Any]]:
    """The configurations of a discrete space, in the order its dimensions and values are written."""
    names = list(space)
    for values in itertools.product(*(values_of(space[name]) for name in names)):
        yield dict(zip(names, values))


class DistinctSampler(BaseSampler):
    """Proposes only configurations that no counted, running or queued trial of the study has.

    ``build(seed)`` makes the configured sampler. With a seed, each trial gets its own sampler seeded by
    ``seed + trial number``: a search is as reproducible as before, while a restarted or second process proposes
    new points instead of replaying the first ones. ``grid``: hand out the space's cells in order, each once
    (Optuna's GridSampler picks cells at random and, when run again, revisits them).
    """

    def __init__(
        self,
        build: Callable[[int | None], BaseSampler],
        space: dict[str, BaseDistribution],
        seed: int | None = None,
        grid: bool = False,
    ):
        if grid:
            continuous = [f"{name}={sweep_syntax(d)}" for name, d in space.items() if values_of(d) is None]
            if continuous:
                raise SearchError(
                    f"a grid search needs discrete dimensions, but {', '.join(continuous)} is "
                    "continuous; use choice(...) or range(a, b) for it, or another sampler"
                )
        self.space, self.seed, self.grid, self.build = space, seed, grid, build
        self.inner = None if grid else build(seed)

    def reseed_rng(self) -> None:
        if self.inner is not None:
            self.inner.reseed_rng()

    def before_trial(self, study: optuna.Study, trial: FrozenTrial) -> None:
        if self.grid:
            return
        if self.seed is not None:
            self.inner = self.build(self.seed + trial.number)
        self.inner.before_trial(study, trial)

    def infer_relative_search_space(self, study: optuna.Study, trial: FrozenTrial) -> dict[str, BaseDistribution]:
        # All of the space is sampled together, so that a whole configuration can be checked; none for a trial
        # queued with its values (a cut-short trial asked again).
        return {} if RETRY_OF in trial.user_attrs else dict(self.space)

    def sample_relative(
        self, study: optuna.Study, trial: FrozenTrial, search_space: dict[str, BaseDistribution]
    ) -> dict[str, Any]:
        if not search_space:
            return {}
        others = taken(study, but=trial.number)
        if self.grid:
            # every cell taken (another process took the last one meanwhile): a repeat, which the sweeper sets aside
            return next(
                (cell for cell in cells(self.space) if configuration(cell) not in others), next(cells(self.space))
            )
        for _ in range(PROPOSALS):
            params = self._proposal(study, trial)
            if configuration(params) not in others:
                return params
        size = space_size(self.space)
        if size is None:
            return params  # a continuous space: the sampler's own repeat, astronomically unlikely
        untaken = [cell for cell in cells(self.space) if configuration(cell) not in others]
        return random.Random(f"{self.seed}-{trial.number}").choice(untaken) if untaken else params

    def _proposal(self, study: optuna.Study, trial: FrozenTrial) -> dict[str, Any]:
        relative = self.inner.infer_relative_search_space(study, trial)
        params = dict(self.inner.sample_relative(study, trial, relative))
        for name, distribution in self.space.items():
            if name not in params:
                params[name] = self.inner.sample_independent(study, trial, name, distribution)
        return params

    def sample_independent(
        self, study: optuna.Study, trial: FrozenTrial, param_name: str, param_distribution: BaseDistribution
    ) -> Any:
        if self.grid:
            raise SearchError(f"{param_name} is not a dimension of the grid")
        return self.inner.sample_independent(study, trial, param_name, param_distribution)

    def after_trial(
        self, study: optuna.Study, trial: FrozenTrial, state: TrialState, values: list[float] | None
    ) -> None:
        if not self.grid:
            self.inner.after_trial(study, trial, state, values)
