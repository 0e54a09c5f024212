"""The ``main`` step: tune -> train (export, benchmark, register) per backbone, then promote.

A parent ``pipeline`` run holds each step as a child run and logs the comparison of all
backbones. A backbone whose inputs (code, parameters, dataset fingerprint) match a finished
earlier run is reused instead of recomputed.
"""

from __future__ import annotations

import logging
import time
from dataclasses import replace

import pandas as pd

from cars_ml import tracking
from cars_ml.data import load_dataset
from cars_ml.modeling import backbones
from cars_ml.pipeline.distill import plan_distillation, student_name
from cars_ml.pipeline.plan import (
    PipelineConfig,
    Plan,
    make_plan,
    resolve,
    resolve_budget,
    resolve_budget_gmacs,
    step_key,
    study_name,
    train_config,
)
from cars_ml.pipeline.pool import Backbone, StepPool
from cars_ml.pipeline.report import (
    COMPARISON_COLUMNS,
    floor_row,
    log_comparison,
    print_report,
    slice_table,
)

log = logging.getLogger(__name__)


def _reusable(cfg: PipelineConfig, key: str):
    """A finished train run with the same step key, when reuse is on."""
    return tracking.find_finished_run({"pipeline_step_key": key}) if cfg.reuse else None


def _reusable_step(cfg: PipelineConfig, step) -> object | None:
    """The finished run a plan step would reuse. A study-only step has none: its study
    resumes and lacks no trial."""
    return _reusable(cfg, step.key) if step.train else None


def _reused(name: str, previous) -> dict:
    """The outcome of a finished earlier run with the same inputs, announced on the console."""
    print(f"[pipeline] {name}: reusing run {previous.info.run_id} (same inputs)", flush=True)
    return {
        "run_id": previous.info.run_id,
        "reused": True,
        "model_version": previous.data.tags.get("model_version"),
        "metrics": previous.data.metrics,
    }


def _distill_steps(
    cfg: PipelineConfig, teacher: dict, students: list[str], fingerprint: str, parent_run_id: str
) -> list[Backbone]:
    """One student's training per backbone: its study's best params, the teacher's outputs."""
    uri = f"models:/{cfg.model_name}/{teacher['model_version']}"
    steps = []
    for student in students:
        key = step_key(cfg, f"{student}<-{uri}:{teacher['run_id']}", fingerprint)
        name = student_name(student, teacher["backbone"])
        previous = _reusable(cfg, key)
        # Every student was tuned in this run, as a backbone or as a named student (a study
        # only), and takes its study's best params.
        train = train_config(
            cfg,
            student,
            key,
            parent_run_id=parent_run_id,
            params_from=study_name(student, step_key(cfg, student, fingerprint)),
            run_name=f"distill-{student}",
            teacher=uri,
            temperature=cfg.temperature,
            alpha=cfg.alpha,
        )
        step = Backbone(name, None, train, tuned=True)
        if previous is not None:
            step.result = _reused(name, previous)
        steps.append(step)
    return steps


def run_pipeline(cfg: PipelineConfig) -> pd.DataFrame:
    """Run the comparison and promotion; returns the comparison table (with ``dry_run``, the
    plan's table, and nothing runs)."""
    from cars_ml.promotion.run import run_promote
    from cars_ml.tuning.storage import open_storage

    tracking.check_tracking_server()
    open_storage(cfg.storage or None)  # A bad or unreachable storage fails before any run.
    started = time.perf_counter()
    cfg = resolve(cfg)
    splits = load_dataset(cfg.data)  # Only for the fingerprint here; each step loads its own.
    plan = make_plan(cfg, splits.fingerprint)
    for line in plan.describe():
        print(f"[pipeline] {line}", flush=True)
    if cfg.dry_run:
        return _dry_run(plan)
    n_trials, max_epochs, hparams = resolve_budget(cfg)
    with tracking.start_run(run_name="pipeline", tags={"step": "pipeline"}) as parent:
        tracking.log_params(
            {
                "preset": cfg.preset,
                "models": ",".join(cfg.models),
                "n_trials": n_trials,
                "max_epochs": max_epochs,
                "epochs": hparams.epochs,
                "trial_fraction": cfg.trial_fraction,
                "fine_tune_epochs": hparams.fine_tune_epochs,
                "qat_epochs": hparams.qat_epochs,
                "weights": cfg.weights,
                "workers": plan.workers,
                "budget_gmacs": resolve_budget_gmacs(cfg),
                "distill": cfg.distill,
                **splits.params(),
            }
        )
        rows = _train_every_backbone(plan, splits.fingerprint, parent.info.run_id)
        slices = slice_table(rows.values())  # The slice table of every backbone and student.
        table = _comparison(rows.values(), _floor(cfg, splits))
        decision = run_promote(cfg.promotion, cfg.model_name, experiment=None)
        table["champion"] = table["model_version"].astype(str) == str(decision.new_champion)
        log_comparison(table, slices)
        wall = time.perf_counter() - started
        tracking.log_metrics({"pipeline_wall_s": wall})
        print_report(table, decision, wall, parent.info.experiment_id, parent.info.run_id)
    return table


def _dry_run(plan: Plan) -> pd.DataFrame:
    """The plan's steps with the earlier run each would reuse; nothing is started."""
    rows = []
    for step in plan.steps:
        previous = _reusable_step(plan.cfg, step)
        rows.append(
            {
                "backbone": step.model if step.train else f"{step.model} (study only)",
                "step_key": step.key,
                "study": step.tune.study_name,
                "reuses_run": previous.info.run_id if previous is not None else "",
            }
        )
    table = pd.DataFrame(rows)
    print(table.to_string(index=False), flush=True)
    print("[pipeline] dry run: nothing started", flush=True)
    return table


def _train_every_backbone(plan: Plan, fingerprint: str, parent_run_id: str) -> dict[str, dict]:
    """Each backbone's study and final training (or a finished earlier run with the same
    inputs), then the students; one row per model."""
    cfg, results, todo = plan.cfg, {}, []
    for step in plan.steps:
        previous = _reusable_step(cfg, step)
        if previous is None:
            tune = replace(step.tune, parent_run_id=parent_run_id)
            train = step.train and replace(step.train, parent_run_id=parent_run_id)
            todo.append(Backbone(step.model, tune, train))
            continue
        results[step.model] = _reused(step.model, previous)
    rows = {m: {"backbone": m, **results.get(m, {})} for m in cfg.models}
    with StepPool(plan.workers) as pool:
        if todo:
            trains = sum(b.train is not None for b in todo)
            print(
                f"[pipeline] {len(todo)} study step(s) and {trains} training(s) to run on "
                f"{plan.workers} worker process(es)",
                flush=True,
            )
            # Largest first: their steps take longest, and one left for last would run alone.
            todo.sort(key=lambda b: backbones.get_backbone(b.model).params, reverse=True)
            for m, r in pool.run(todo).items():
                if r is not None:  # None: a study only.
                    rows[m] = {"backbone": m, **r, "reused": False}
        if cfg.distill:
            rows.update(_distill(cfg, list(rows.values()), fingerprint, parent_run_id, pool))
    return rows


def _comparison(rows, floor: dict | None) -> pd.DataFrame:
    """The comparison table: one row per model (its run, version, teacher and metrics), and
    the frozen-feature floor's when there is one."""
    table = [
        {
            "backbone": r["backbone"],
            "run_id": r["run_id"],
            "model_version": r["model_version"],
            "reused": r["reused"],
            "teacher": r.get("teacher", ""),
            "teacher_version": r.get("teacher_version", ""),
            **{c: r["metrics"].get(c) for c in COMPARISON_COLUMNS},
        }
        for r in rows
    ]
    if floor is not None:
        table.append(floor_row(floor))
    return pd.DataFrame(table)


def _floor(cfg: PipelineConfig, splits) -> dict | None:
    """The frozen-feature floor on real data (logged on the pipeline run), else ``None``."""
    if cfg.data.data == "synthetic":
        return None
    from cars_ml.tuning.floor import FLOOR_BACKBONE, frozen_feature_floor

    print(
        f"[pipeline] frozen-feature floor: a logistic regression on frozen {FLOOR_BACKBONE} "
        "features",
        flush=True,
    )
    try:
        floor = frozen_feature_floor(splits)
    except ValueError as exc:  # No ImageNet weights for the floor's backbone.
        print(f"[pipeline] no floor: {exc}", flush=True)
        return None
    tracking.log_metrics({f"floor_{k}": v for k, v in floor.items() if k != "C"})
    tracking.log_params({"floor_backbone": FLOOR_BACKBONE, "floor_C": floor["C"]})
    return floor


def _distill(
    cfg: PipelineConfig, rows: list[dict], fingerprint: str, parent_run_id: str, pool: StepPool
) -> dict[str, dict]:
    """The distillation step: the run's best version teaches the backbones within budgets."""
    teacher, students, why = plan_distillation(rows, cfg.promotion.budgets, cfg.distill_students)
    if not students:
        print(f"[pipeline] no distillation: {why}", flush=True)
        return {}
    label = f"{teacher['backbone']} v{teacher['model_version']}"
    print(
        f"[pipeline] distilling {label} (test macro-F1 "
        f"{teacher['metrics']['test_f1_macro']:.3f}, validation "
        f"{teacher['metrics']['val_f1_macro']:.3f}) into {', '.join(students)}",
        flush=True,
    )
    steps = _distill_steps(cfg, teacher, students, fingerprint, parent_run_id)
    todo = [s for s in steps if s.result is None]
    done = {s.model: {**s.result} for s in steps if s.result is not None}
    if todo:
        done.update({m: {**r, "reused": False} for m, r in pool.run(todo).items()})
    lineage = {"teacher": teacher["backbone"], "teacher_version": teacher["model_version"]}
    return {m: {"backbone": m, **lineage, **r} for m, r in done.items()}
