"""An Optuna sampler whose randomness is keyed on the trial number, so workers never repeat.

A seeded Optuna sampler starts from the same random state in every process: two workers on one
study, or a study resumed by a second run, draw the same start-up parameters trial after trial
(measured: trials 2 and 3 of a resumed study repeated trials 0 and 1 exactly). The storage hands
out each trial number once per study, so seeding each trial's draw with ``seed + number`` keeps
a single-process run reproducible and makes every worker's draws distinct.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import optuna
from optuna.distributions import BaseDistribution
from optuna.samplers import BaseSampler
from optuna.trial import FrozenTrial, TrialState

_KEEP = 8  # Samplers of recent trials kept; a process runs one trial at a time.


class PerTrialSeedSampler(BaseSampler):
    """Delegates each trial to ``make(seed + trial.number)``; the study history is shared."""

    def __init__(self, make: Callable[[int], BaseSampler], seed: int) -> None:
        self._make = make
        self._seed = seed
        self._samplers: dict[int, BaseSampler] = {}

    def _for(self, trial: FrozenTrial) -> BaseSampler:
        if trial.number not in self._samplers:
            self._samplers[trial.number] = self._make(self._seed + trial.number)
            for old in sorted(self._samplers)[:-_KEEP]:
                del self._samplers[old]
        return self._samplers[trial.number]

    def infer_relative_search_space(
        self, study: optuna.Study, trial: FrozenTrial
    ) -> dict[str, BaseDistribution]:
        return self._for(trial).infer_relative_search_space(study, trial)

    def sample_relative(
        self, study: optuna.Study, trial: FrozenTrial, search_space: dict[str, BaseDistribution]
    ) -> dict[str, Any]:
        return self._for(trial).sample_relative(study, trial, search_space)

    def sample_independent(
        self,
        study: optuna.Study,
        trial: FrozenTrial,
        param_name: str,
        param_distribution: BaseDistribution,
    ) -> Any:
        return self._for(trial).sample_independent(study, trial, param_name, param_distribution)

    def before_trial(self, study: optuna.Study, trial: FrozenTrial) -> None:
        self._for(trial).before_trial(study, trial)

    def after_trial(
        self,
        study: optuna.Study,
        trial: FrozenTrial,
        state: TrialState,
        values: Sequence[float] | None,
    ) -> None:
        self._for(trial).after_trial(study, trial, state, values)
        self._samplers.pop(trial.number, None)

    def reseed_rng(self) -> None:
        """Seeds are per trial already; nothing to reseed (Optuna calls this for n_jobs > 1)."""


def make_sampler(seed: int, *, multi_objective: bool) -> BaseSampler:
    """NSGA-II for several objectives, TPE otherwise; both seeded per trial.

    TPE's constant liar treats trials still running in other workers as poor results, so
    parallel workers spread out instead of sampling next to each other.
    """
    if multi_objective:
        return PerTrialSeedSampler(lambda s: optuna.samplers.NSGAIISampler(seed=s), seed)
    return PerTrialSeedSampler(
        lambda s: optuna.samplers.TPESampler(seed=s, constant_liar=True), seed
    )
