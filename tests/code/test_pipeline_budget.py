"""The demo's small budget applies to the synthetic data only, never to a real dataset."""

from __future__ import annotations

import pytest

from cars_ml.data import DataConfig
from cars_ml.pipeline import (
    DEMO_BUDGET,
    DEMO_MAX_PER_CLASS,
    DEMO_TRIAL_FRACTION,
    REAL_BUDGET,
    PipelineConfig,
    resolve_budget,
    resolve_data,
    resolve_trial_fraction,
)

REAL = DataConfig(data="/data/stanford_cars")


def test_auto_budget_depends_on_the_dataset():
    demo, real = PipelineConfig(), PipelineConfig(data=REAL)
    n_trials, max_epochs, hp = resolve_budget(demo)
    assert (n_trials, max_epochs, hp.epochs, hp.fine_tune_epochs) == DEMO_BUDGET
    n_trials, max_epochs, hp = resolve_budget(real)
    assert (n_trials, max_epochs, hp.epochs, hp.fine_tune_epochs) == REAL_BUDGET
    assert resolve_trial_fraction(demo) == DEMO_TRIAL_FRACTION < 1.0
    assert resolve_trial_fraction(real) == 1.0


def test_demo_caps_the_synthetic_classes_only_when_asked_for_auto():
    assert resolve_data(PipelineConfig()).max_per_class == DEMO_MAX_PER_CLASS
    assert resolve_data(PipelineConfig(data=DataConfig(max_per_class=8))).max_per_class == 8
    assert resolve_data(PipelineConfig(data=REAL)) == REAL


def test_explicit_trial_fraction_wins_on_any_dataset():
    assert resolve_trial_fraction(PipelineConfig(trial_fraction=0.25)) == 0.25
    assert resolve_trial_fraction(PipelineConfig(data=REAL, trial_fraction=0.3)) == 0.3
    assert resolve_trial_fraction(PipelineConfig(trial_fraction=1.0)) == 1.0


@pytest.mark.parametrize("fraction", [-0.1, 1.01])
def test_trial_fraction_outside_0_1_is_refused(fraction):
    with pytest.raises(ValueError, match=f"trial_fraction must be in \\[0, 1\\] .*got {fraction}"):
        PipelineConfig(trial_fraction=fraction)
