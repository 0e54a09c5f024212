"""Per-trial seeding: workers sharing a study (or a resumed study) never repeat a draw, and one
process with one seed stays reproducible."""

from __future__ import annotations

import optuna
import pytest

from cars_ml.tuning.sampler import PerTrialSeedSampler, make_sampler

optuna.logging.set_verbosity(optuna.logging.WARNING)


def _objective(trial: optuna.Trial) -> float:
    lr = trial.suggest_float("learning_rate", 1e-4, 1e-2, log=True)
    units = trial.suggest_categorical("head_units", [0, 128, 256, 512])
    return lr * 100 + units / 512


def _draws(study: optuna.Study) -> list[tuple]:
    return [tuple(sorted(t.params.items())) for t in study.trials]


@pytest.mark.parametrize("multi", [False, True])
def test_two_workers_with_one_seed_on_one_study_never_repeat(tmp_path, multi):
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    directions = ["maximize", "minimize"] if multi else ["maximize"]

    def objective(trial):
        value = _objective(trial)
        return (value, -value) if multi else value

    # Each "worker" is a separate sampler object with the same seed, as separate processes
    # would be; they take turns on the study, as a resumed study or interleaved workers do.
    workers = [
        optuna.create_study(
            study_name="s",
            storage=storage,
            directions=directions,
            sampler=make_sampler(7, multi_objective=multi),
            load_if_exists=True,
        )
        for _ in range(2)
    ]
    for _ in range(3):
        for worker in workers:
            worker.optimize(objective, n_trials=2)
    study = optuna.load_study(study_name="s", storage=storage)
    assert len(study.trials) == 12
    assert len(set(_draws(study))) == 12


def test_plain_seeded_sampler_repeats_which_is_why_the_wrapper_exists(tmp_path):
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    for _ in range(2):
        study = optuna.create_study(
            study_name="s",
            storage=storage,
            load_if_exists=True,
            sampler=optuna.samplers.TPESampler(seed=7),
        )
        study.optimize(_objective, n_trials=2)
    draws = _draws(study)
    assert draws[:2] == draws[2:]


def test_one_seed_one_process_is_reproducible():
    runs = []
    for _ in range(2):
        study = optuna.create_study(
            direction="maximize", sampler=make_sampler(3, multi_objective=False)
        )
        study.optimize(_objective, n_trials=12)  # past TPE's 10 random start-up trials
        runs.append(_draws(study))
    assert runs[0] == runs[1]
    other = optuna.create_study(
        direction="maximize", sampler=make_sampler(4, multi_objective=False)
    )
    other.optimize(_objective, n_trials=3)
    assert _draws(other) != runs[0][:3]


def test_only_recent_trial_samplers_are_kept():
    made = []
    sampler = PerTrialSeedSampler(lambda s: made.append(s) or optuna.samplers.RandomSampler(s), 10)
    study = optuna.create_study(sampler=sampler)
    study.optimize(_objective, n_trials=20)
    assert made == [10 + n for n in range(20)]
    assert len(sampler._samplers) <= 8
