"""The ``main`` step: tune -> train (export, benchmark, register) per backbone, then promote.

A parent ``pipeline`` run holds each step as a child run and logs the comparison of all
backbones. A backbone whose inputs (code, parameters, dataset fingerprint) match a finished
earlier run is reused instead of recomputed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import pandas as pd

import cars_ml
from cars_ml import tracking
from cars_ml.data import DataConfig, load_dataset
from cars_ml.modeling import backbones
from cars_ml.pipeline.distill import plan_distillation, student_name
from cars_ml.pipeline.pool import Backbone, StepPool
from cars_ml.pipeline.report import COMPARISON_COLUMNS, log_comparison, print_report
from cars_ml.promotion.policy import PromotionConfig
from cars_ml.training.hparams import (
    DEFAULT_ALPHA,
    DEFAULT_TEMPERATURE,
    HParams,
    check_distill_params,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PipelineConfig:
    """The whole comparison; demo budgets apply only to the synthetic data."""

    models: tuple[str, ...] = backbones.ORIGINAL_BACKBONES
    data: DataConfig = field(default_factory=DataConfig)
    n_trials: int = 0  # 0 = auto: DEMO_BUDGET on synthetic data, REAL_BUDGET otherwise
    max_epochs: int = 0
    storage: str = ""
    image_size: int = backbones.AUTO_SIZE
    weights: str = "auto"
    epochs: int = 0
    fine_tune_epochs: int = -1
    promotion: PromotionConfig = field(default_factory=PromotionConfig)
    model_name: str = cars_ml.REGISTERED_MODEL_NAME
    reuse: bool = True
    seed: int = 42
    workers: int = 0  # processes running steps; 0 = auto: 2 on the synthetic demo data, else 1
    trial_fraction: float = 0.0  # training images per trial; 0 = auto (DEMO_TRIAL_FRACTION / 1)
    # Training compute per image of each final training, in GMACs: epochs by cost
    # (hparams.epochs_for_budget). -1 = auto: DEMO_BUDGET_GMACS on synthetic data, off on real.
    budget_gmacs: float = -1.0
    # Distil the run's best model into the backbones that pass the edge budgets (or into
    # ``distill_students``) after every backbone has trained.
    distill: bool = True
    distill_students: tuple[str, ...] = ()
    temperature: float = DEFAULT_TEMPERATURE
    alpha: float = DEFAULT_ALPHA

    def __post_init__(self) -> None:
        check_distill_params(self.temperature, self.alpha)
        for name in self.distill_students:
            backbones.get_backbone(name)
        if not (self.budget_gmacs >= 0 or self.budget_gmacs == -1):
            raise ValueError(
                f"budget_gmacs must be >= 0 (0 = off) or -1 (auto), got {self.budget_gmacs}."
            )
        if not self.models:
            raise ValueError("models is empty; pass e.g. models=mobilenet,resnet.")
        if not 0.0 <= self.trial_fraction <= 1.0:
            raise ValueError(
                f"trial_fraction must be in [0, 1] (0 = auto), got {self.trial_fraction}."
            )
        if self.workers < 0:
            raise ValueError(f"workers must be >= 0 (0 = auto), got {self.workers}.")
        for name in self.models:
            # Every backbone's image size is checked now, not after earlier backbones trained.
            backbones.resolve_image_size(backbones.get_backbone(name), self.image_size)
        backbones.validate_weights(self.weights)


# (n_trials, max_epochs per trial, epochs, fine_tune_epochs): the demo's small budget must
# never leak into real-data runs, so "auto" picks by dataset.
DEMO_BUDGET = (2, 1, 2, 0)
REAL_BUDGET = (20, 5, 8, 4)
# Share of the training split each tuning trial trains on. The demo's trials rank
# hyperparameters on half of it: on a 2-core CPU a trial is mostly compute (Inception-ResNet-v2
# at 75 px: ~20 s of tracing, ~65 s per epoch of 340 images), and the final training still sees
# every image. Real data tunes on all of it unless trial_fraction says otherwise.
DEMO_TRIAL_FRACTION = 0.5
# Images per class the demo takes of the synthetic dataset's 40 (max_per_class=0 = auto). Two
# fits side by side with default hyperparameters took 20-40% less time on 2 cores at a small F1
# cost (Inception 0.96 vs 0.99, MobileNet 0.39 vs 0.42); in a whole demo run ResNet50 and
# Inception fell further (0.79, 0.73; README), the price of the 10-minute goal on slow CPUs.
DEMO_MAX_PER_CLASS = 28


# The demo's training compute per image: about two epochs of its costliest backbones
# (Inception-ResNet-v2 at 75 px: 0.43 GMACs forward, 1.3 per training image and epoch). MobileNet
# at 64 px costs a ninth of that and gets 17 epochs instead of 2: test macro-F1 0.51 -> 0.98-1.00
# in about 25 s more. Real data keeps equal epochs with early stopping unless budget_gmacs is set.
DEMO_BUDGET_GMACS = 2.5


def resolve_budget_gmacs(cfg: PipelineConfig) -> float:
    """The auto (-1) compute budget: ``DEMO_BUDGET_GMACS`` on synthetic data, else off (0)."""
    if cfg.budget_gmacs >= 0:
        return cfg.budget_gmacs
    return DEMO_BUDGET_GMACS if cfg.data.data == "synthetic" else 0.0


def resolve_data(cfg: PipelineConfig) -> DataConfig:
    """The dataset the steps load: the demo caps the synthetic classes, real data is whole."""
    if cfg.data.data == "synthetic" and cfg.data.max_per_class == 0:
        return replace(cfg.data, max_per_class=DEMO_MAX_PER_CLASS)
    return cfg.data


def resolve_trial_fraction(cfg: PipelineConfig) -> float:
    """The auto (0) trial fraction: ``DEMO_TRIAL_FRACTION`` on synthetic data, else 1."""
    if cfg.trial_fraction:
        return cfg.trial_fraction
    return DEMO_TRIAL_FRACTION if cfg.data.data == "synthetic" else 1.0


def resolve_budget(cfg: PipelineConfig) -> tuple[int, int, HParams]:
    """Resolve the auto (0 / -1) budget knobs: ``(n_trials, max_epochs, hparams)``."""
    base = DEMO_BUDGET if cfg.data.data == "synthetic" else REAL_BUDGET
    n_trials = cfg.n_trials or base[0]
    max_epochs = cfg.max_epochs or base[1]
    epochs = cfg.epochs or base[2]
    fine_tune = base[3] if cfg.fine_tune_epochs < 0 else cfg.fine_tune_epochs
    return n_trials, max_epochs, HParams(epochs=epochs, fine_tune_epochs=fine_tune)


def resolve_workers(cfg: PipelineConfig) -> int:
    """Processes that run the pipeline's steps (``pipeline.pool``).

    Auto means 2 for the synthetic demo on a machine with two or more cores and 1 otherwise: on
    real data each step is long and compute-bound, and workers sharing one GPU would each
    claim its memory.
    """
    import os

    workers = cfg.workers
    if workers == 0:
        workers = 2 if cfg.data.data == "synthetic" and (os.cpu_count() or 1) >= 2 else 1
    return workers


def code_version() -> str:
    """A hash of the library's source, so a code change invalidates reused steps."""
    digest = hashlib.sha256()
    for path in sorted(Path(cars_ml.__file__).parent.rglob("*.py")):
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def step_key(cfg: PipelineConfig, model: str, fingerprint: str) -> str:
    """Key of one backbone's tune+train: code version, its parameters and the dataset."""
    n_trials, max_epochs, hparams = resolve_budget(cfg)
    inputs = {
        "code": code_version(),
        "model": model,
        "fingerprint": fingerprint,
        "n_trials": n_trials,
        "max_epochs": max_epochs,
        "image_size": cfg.image_size,
        "trial_fraction": cfg.trial_fraction,
        "weights": cfg.weights,
        "hparams": asdict(hparams),
        "data": asdict(cfg.data),
        "seed": cfg.seed,
        "storage": tracking.redact(cfg.storage),
        "model_name": cfg.model_name,
        "budget_gmacs": resolve_budget_gmacs(cfg),
    }
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:24]


def _reusable(cfg: PipelineConfig, key: str):
    """A finished train run with the same step key, when reuse is on."""
    return tracking.find_finished_run({"pipeline_step_key": key}) if cfg.reuse else None


def study_name(model: str, key: str) -> str:
    """The Optuna study of ``model``'s step ``key``; its final training (and a student of the
    same backbone) takes the best params from it."""
    return f"pipeline-{model}-{key[:8]}"


def _reused(name: str, previous) -> dict:
    """The outcome of a finished earlier run with the same inputs, announced on the console."""
    print(f"[pipeline] {name}: reusing run {previous.info.run_id} (same inputs)", flush=True)
    return {
        "run_id": previous.info.run_id,
        "reused": True,
        "model_version": previous.data.tags.get("model_version"),
        "metrics": previous.data.metrics,
    }


def _steps(cfg: PipelineConfig, model: str, key: str, parent_run_id: str, workers: int) -> Backbone:
    """One backbone's study and final training, both children of the pipeline run.

    With several workers their lines interleave, so trials print one line each (no bar).
    """
    from cars_ml.tuning.run import TuneConfig

    n_trials, max_epochs, hparams = resolve_budget(cfg)
    study = study_name(model, key)
    tune = TuneConfig(
        model=model,
        data=cfg.data,
        n_trials=n_trials,
        storage=cfg.storage,
        image_size=cfg.image_size,
        weights=cfg.weights,
        seed=cfg.seed,
        max_epochs=max_epochs,
        trial_fraction=cfg.trial_fraction,
        study_name=study,
        study_total=True,
        parent_run_id=parent_run_id,
        progress_bar=workers == 1,
        # The trials' share of the final training's compute, as max_epochs is of its epochs.
        budget_gmacs=resolve_budget_gmacs(cfg) * max_epochs / hparams.epochs,
    )
    train = _train_config(cfg, model, key, parent_run_id, params_from=study)
    return Backbone(model, tune, train)


def _train_config(cfg: PipelineConfig, model: str, key: str, parent_run_id: str, **extra):
    """The final training of ``model`` in this pipeline run (plain or, with ``extra``, a
    student's): the run's data, budget and seed, a child of the pipeline run."""
    from cars_ml.training.run import TrainConfig

    _, _, hparams = resolve_budget(cfg)
    return TrainConfig(
        model=model,
        data=cfg.data,
        weights=cfg.weights,
        image_size=cfg.image_size,
        hparams=hparams,
        seed=cfg.seed,
        model_name=cfg.model_name,
        storage=cfg.storage,
        verbose=2,
        run_tags={"pipeline_step_key": key},
        parent_run_id=parent_run_id,
        budget_gmacs=resolve_budget_gmacs(cfg),
        **extra,
    )


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
        train = _train_config(
            cfg,
            student,
            key,
            parent_run_id,
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
    """Run the comparison and promotion; returns the comparison table."""
    from cars_ml.promotion.run import run_promote
    from cars_ml.tuning.storage import open_storage

    tracking.check_tracking_server()
    open_storage(cfg.storage or None)  # A bad or unreachable storage fails before any run.
    # The auto (0) knobs resolve once here; every step and the step keys see the same values.
    cfg = replace(cfg, data=resolve_data(cfg), trial_fraction=resolve_trial_fraction(cfg))
    started = time.perf_counter()
    splits = load_dataset(cfg.data)  # Only for the fingerprint here; each step loads its own.
    n_trials, max_epochs, hparams = resolve_budget(cfg)
    workers = resolve_workers(cfg)
    with tracking.start_run(run_name="pipeline", tags={"step": "pipeline"}) as parent:
        tracking.log_params(
            {
                "models": ",".join(cfg.models),
                "n_trials": n_trials,
                "max_epochs": max_epochs,
                "epochs": hparams.epochs,
                "trial_fraction": cfg.trial_fraction,
                "fine_tune_epochs": hparams.fine_tune_epochs,
                "weights": cfg.weights,
                "workers": workers,
                "budget_gmacs": resolve_budget_gmacs(cfg),
                "distill": cfg.distill,
                **splits.params(),
            }
        )
        results, todo = {}, []
        for model in cfg.models:
            key = step_key(cfg, model, splits.fingerprint)
            previous = _reusable(cfg, key)
            if previous is None:
                todo.append(_steps(cfg, model, key, parent.info.run_id, workers))
                continue
            results[model] = _reused(model, previous)
        rows = {m: {"backbone": m, **results.get(m, {})} for m in cfg.models}
        with StepPool(workers) as pool:
            if todo:
                print(
                    f"[pipeline] {len(todo)} backbone(s) to tune ({n_trials} trials x {max_epochs} "
                    f"epochs on {cfg.trial_fraction:.0%} of the training images) and train on {workers} worker "
                    "process(es)",
                    flush=True,
                )
                # Largest first: their steps take longest, and one left for last would run alone.
                todo.sort(key=lambda b: backbones.get_backbone(b.model).params, reverse=True)
                for m, r in pool.run(todo).items():
                    rows[m] = {"backbone": m, **r, "reused": False}
            if cfg.distill:
                rows.update(
                    _distill(cfg, list(rows.values()), splits.fingerprint, parent.info.run_id, pool)
                )
        rows = [
            {
                "backbone": r["backbone"],
                "run_id": r["run_id"],
                "model_version": r["model_version"],
                "reused": r["reused"],
                "teacher": r.get("teacher", ""),
                "teacher_version": r.get("teacher_version", ""),
                **{c: r["metrics"].get(c) for c in COMPARISON_COLUMNS},
            }
            for r in rows.values()
        ]
        decision = run_promote(cfg.promotion, cfg.model_name, experiment=None)
        table = pd.DataFrame(rows)
        table["champion"] = table["model_version"].astype(str) == str(decision.new_champion)
        log_comparison(table)
        wall = time.perf_counter() - started
        tracking.log_metrics({"pipeline_wall_s": wall})
        print_report(table, decision, wall, parent.info.experiment_id)
    return table


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
        f"{teacher['metrics']['test_f1_macro']:.3f}) into {', '.join(students)}",
        flush=True,
    )
    steps = _distill_steps(cfg, teacher, students, fingerprint, parent_run_id)
    todo = [s for s in steps if s.result is None]
    done = {s.model: {**s.result} for s in steps if s.result is not None}
    if todo:
        done.update({m: {**r, "reused": False} for m, r in pool.run(todo).items()})
    lineage = {"teacher": teacher["backbone"], "teacher_version": teacher["model_version"]}
    return {m: {"backbone": m, **lineage, **r} for m, r in done.items()}
