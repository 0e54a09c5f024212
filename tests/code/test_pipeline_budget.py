"""The demo's small budget applies to the synthetic data only, never to a real dataset; compute
budgets buy epochs by cost; the distillation plan picks its teacher and students."""

from __future__ import annotations

from dataclasses import replace

import pytest

from cars_ml.data import DataConfig
from cars_ml.pipeline.distill import plan_distillation
from cars_ml.pipeline.plan import (
    DEMO_BUDGET_GMACS,
    DEMO_MAX_PER_CLASS,
    DEMO_TRIAL_FRACTION,
    PRESETS,
    PipelineConfig,
    resolve_budget,
    resolve_budget_gmacs,
    resolve_data,
    resolve_models,
    resolve_preset,
    resolve_students,
    resolve_trial_fraction,
    resolve_workers,
)
from cars_ml.promotion.policy import Budgets
from cars_ml.training.hparams import BUDGET_MAX_EPOCH_FACTOR, HParams, epochs_for_budget

REAL = DataConfig(data="/data/stanford_cars")


def _budget(cfg):
    n_trials, max_epochs, hp = resolve_budget(cfg)
    return n_trials, max_epochs, hp.epochs, hp.fine_tune_epochs


def test_auto_budget_depends_on_the_dataset_and_the_hardware(monkeypatch):
    from cars_ml.pipeline import config

    demo, real = PipelineConfig(), PipelineConfig(data=REAL)
    assert _budget(demo) == PRESETS["demo"].budget
    assert resolve_models(demo) == PRESETS["demo"].models
    monkeypatch.setattr(config, "has_gpu", lambda: False)
    assert resolve_preset(real).name == "cpu"
    assert _budget(real) == PRESETS["cpu"].budget
    assert resolve_models(real) == ("efficientnet_lite2",)
    assert resolve_students(real) == ("efficientnet_lite0",)
    assert resolve_students(demo) == ()  # every other backbone within the edge budgets
    monkeypatch.setattr(config, "has_gpu", lambda: True)
    assert resolve_preset(real).name == "full"
    assert _budget(real) == PRESETS["full"].budget
    # A named preset wins over the hardware, explicit knobs over the preset.
    assert resolve_preset(PipelineConfig(data=REAL, preset="cpu")).name == "cpu"
    assert _budget(PipelineConfig(data=REAL, preset="cpu", epochs=3))[2] == 3
    # Quantization-aware epochs: train's default unless given.
    assert resolve_budget(real)[2].qat_epochs == HParams().qat_epochs > 0
    assert resolve_budget(PipelineConfig(data=REAL, qat_epochs=0))[2].qat_epochs == 0
    assert resolve_models(PipelineConfig(data=REAL, models=("mobilenet",))) == ("mobilenet",)
    assert resolve_trial_fraction(demo) == DEMO_TRIAL_FRACTION < 1.0
    assert resolve_trial_fraction(real) == 1.0


def test_cpu_runs_take_two_workers_and_gpu_runs_one(monkeypatch):
    from cars_ml.pipeline import config

    monkeypatch.setattr("os.cpu_count", lambda: 2)
    monkeypatch.setattr(config, "has_gpu", lambda: False)
    assert resolve_workers(PipelineConfig()) == 2
    assert resolve_workers(PipelineConfig(data=REAL)) == 2
    assert resolve_workers(PipelineConfig(data=REAL, workers=1)) == 1
    monkeypatch.setattr(config, "has_gpu", lambda: True)
    assert resolve_workers(PipelineConfig(data=REAL)) == 1
    monkeypatch.setattr("os.cpu_count", lambda: 1)
    assert resolve_workers(PipelineConfig()) == 1


def test_the_demo_preset_is_for_the_synthetic_data_only():
    with pytest.raises(ValueError, match="preset=cpu"):
        PipelineConfig(data=REAL, preset="demo")
    with pytest.raises(ValueError, match="not one of auto, demo, cpu, full"):
        PipelineConfig(preset="fast")


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


def test_compute_budget_is_auto_on_the_demo_only():
    assert resolve_budget_gmacs(PipelineConfig()) == DEMO_BUDGET_GMACS > 0
    assert resolve_budget_gmacs(PipelineConfig(data=REAL)) == 0.0
    assert resolve_budget_gmacs(PipelineConfig(data=REAL, budget_gmacs=40.0)) == 40.0
    assert resolve_budget_gmacs(PipelineConfig(budget_gmacs=0.0)) == 0.0
    with pytest.raises(ValueError, match="budget_gmacs must be >= 0"):
        PipelineConfig(budget_gmacs=-2.0)


# Forward GMACs per image at the demo's sizes (counted with cars_ml.measure.macs).
DEMO_FORWARD_GMACS = {
    "inception_resnet": 0.433,
    "xception": 0.551,
    "inception": 0.201,
    "resnet": 0.315,
    "vgg16": 0.313,
    "vgg19": 0.398,
    "mobilenet": 0.0463,
}


@pytest.mark.parametrize(
    ("model", "epochs"),
    [("inception_resnet", 2), ("xception", 2), ("vgg19", 2), ("inception", 4), ("mobilenet", 17)],
)
def test_demo_budget_buys_epochs_by_cost(model, epochs):
    assert epochs_for_budget(DEMO_BUDGET_GMACS, DEMO_FORWARD_GMACS[model], 2) == epochs


def test_budget_epochs_are_floored_at_the_given_epochs_and_capped():
    assert epochs_for_budget(0.0, 0.05, 3) == 3  # off
    assert epochs_for_budget(1.0, 10.0, 3) == 3  # too costly: never fewer than asked for
    assert epochs_for_budget(1e6, 0.001, 3) == 3 * BUDGET_MAX_EPOCH_FACTOR
    with pytest.raises(ValueError, match="must be >= 0"):
        epochs_for_budget(-1.0, 0.05, 3)


def _row(backbone, version, f1, p95, size, test_f1=None):
    metrics = {"val_f1_macro": f1, "latency_ms_p95": p95, "model_size_mb": size}
    return {
        "backbone": backbone,
        "model_version": version,
        "run_id": f"r{version}",
        "metrics": {**metrics, "test_f1_macro": f1 if test_f1 is None else test_f1},
    }


ROWS = [
    _row("xception", "1", 1.0, 22.0, 83.0),
    _row("inception_resnet", "2", 1.0, 45.0, 220.0),
    _row("mobilenet", "3", 0.9, 5.0, 13.0),
    _row("mobilenet_v2", "4", 0.8, 4.0, 9.0),
    _row("vgg16", "5", 0.5, 30.0, 59.0),
]


def test_the_best_model_teaches_the_backbones_within_the_edge_budgets():
    teacher, students, why = plan_distillation(ROWS, Budgets())
    # A tie on F1 goes to the faster teacher: the students pay for its forward passes.
    assert teacher["backbone"] == "xception" and why == ""
    assert students == ["mobilenet", "mobilenet_v2"]  # vgg16 is over the 50 MB size budget
    teacher, students, _ = plan_distillation(ROWS, Budgets(max_latency_ms=4.5))
    assert students == ["mobilenet_v2"]


def test_the_teacher_is_chosen_on_validation_never_on_the_test_split():
    rows = [_row("a", "1", 0.7, 5.0, 10.0, test_f1=0.9), _row("b", "2", 0.8, 5.0, 10.0, 0.6)]
    teacher, students, _ = plan_distillation(rows, Budgets())
    assert teacher["backbone"] == "b" and students == ["a"]


def test_students_can_be_named_and_a_run_without_candidates_says_why():
    _, students, _ = plan_distillation(ROWS, Budgets(), ("vgg16",))
    assert students == ["vgg16"]
    teacher, students, why = plan_distillation(ROWS[:1], Budgets())
    assert teacher["backbone"] == "xception" and students == [] and "budgets" in why
    teacher, students, why = plan_distillation([{**ROWS[0], "model_version": None}], Budgets())
    assert teacher is None and students == [] and "no registered version" in why


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"temperature": 0.0}, "temperature=0.0 must be > 0"),
        ({"alpha": 1.5}, "alpha=1.5 must be"),
        ({"distill_students": ("bogus",)}, "Unknown backbone 'bogus'"),
    ],
)
def test_bad_distillation_settings_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        PipelineConfig(**kwargs)


def test_the_plan_is_resolved_once_as_plain_configs():
    from cars_ml.pipeline.plan import make_plan, step_key

    cfg = PipelineConfig(models=("mobilenet", "vgg16"), n_trials=3, image_size=32)
    plan = make_plan(cfg, "fingerprint")
    assert [s.model for s in plan.steps] == ["mobilenet", "vgg16"]
    assert plan.cfg.preset == "demo" and plan.cfg.data.max_per_class == 28  # auto knobs resolved
    assert make_plan(plan.cfg, "fingerprint") == plan  # resolving again changes nothing
    for step in plan.steps:
        assert step.key == step_key(plan.cfg, step.model, "fingerprint")
        assert (
            step.train.params_from
            == step.tune.study_name
            == f"pipeline-{step.model}-{step.key[:8]}"
        )
        assert step.tune.n_trials == 3 and step.tune.study_total
        assert step.train.run_tags == {"pipeline_step_key": step.key}
        assert not step.tune.parent_run_id and not step.train.parent_run_id  # filled when queued
    assert make_plan(cfg, "other data").steps[0].key != plan.steps[0].key
    text = "\n".join(plan.describe())
    assert "3 trials" in text and "vgg16: study pipeline-vgg16-" in text


def test_a_named_student_outside_the_backbones_gets_a_study_but_no_training():
    from cars_ml.pipeline.plan import make_plan, step_key

    cfg = PipelineConfig(data=REAL, preset="cpu", image_size=32, weights="none")
    plan = make_plan(cfg, "fingerprint")
    teacher, student = plan.steps
    assert (teacher.model, student.model) == ("efficientnet_lite2", "efficientnet_lite0")
    assert teacher.train is not None and student.train is None
    # The student's training (after the teacher's) takes its params from this study.
    assert student.tune.study_name.startswith("pipeline-efficientnet_lite0-")
    assert student.key == step_key(plan.cfg, "efficientnet_lite0", "fingerprint")
    assert "efficientnet_lite0: study" in "\n".join(plan.describe())
    assert "study only" in plan.describe()[-1]
    # A student that is a backbone of the run, or no distillation, adds no study.
    both = make_plan(replace(cfg, models=("efficientnet_lite2", "efficientnet_lite0")), "f")
    assert all(s.train is not None for s in both.steps) and len(both.steps) == 2
    assert [s.model for s in make_plan(replace(cfg, distill=False), "f").steps] == [
        "efficientnet_lite2"
    ]
