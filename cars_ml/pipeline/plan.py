"""The pipeline's plan, pure: its config, the budgets and worker count it resolves to, and the
keys that let a finished step be reused (code version, parameters, dataset fingerprint)."""

from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import asdict, replace
from pathlib import Path

import cars_ml
from cars_ml.data import DataConfig
from cars_ml.pipeline.config import (  # noqa: F401  (re-exported)
    LITE_BACKBONES,
    PRESETS,
    PipelineConfig,
    Preset,
    has_gpu,
    resolve_preset,
)
from cars_ml.tracking.redaction import redact
from cars_ml.training.hparams import (
    HParams,
)

# Share of the training split each tuning trial trains on. The demo's trials rank
# hyperparameters on half of it: on a CPU a trial of a large backbone is mostly compute, and the
# final training still sees every image. Real data tunes on all of it unless trial_fraction says otherwise.
DEMO_TRIAL_FRACTION = 0.5
# Images per class the demo takes of the synthetic dataset's 40 (max_per_class=0 = auto): a
# fifth to two fifths less time for a small loss of F1, the price of the 10-minute goal on slow
# CPUs (docs/performance.md).
DEMO_MAX_PER_CLASS = 28


# The demo's training compute per image: about two epochs of its costliest backbone
# (Inception-ResNet-v2), so cheap backbones get many more epochs for the same compute instead of
# stopping far from what they can reach (docs/performance.md). Real data keeps equal epochs with
# early stopping unless budget_gmacs is set.
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


def resolve_models(cfg: PipelineConfig) -> tuple[str, ...]:
    return cfg.models or resolve_preset(cfg).models


def resolve_students(cfg: PipelineConfig) -> tuple[str, ...]:
    """The students named by ``distill_students``, else the preset's (empty: by budget)."""
    return cfg.distill_students or resolve_preset(cfg).students


def resolve_budget(cfg: PipelineConfig) -> tuple[int, int, HParams]:
    """Resolve the auto (0 / -1) budget knobs: ``(n_trials, max_epochs, hparams)``."""
    base = resolve_preset(cfg).budget
    n_trials = cfg.n_trials or base[0]
    max_epochs = cfg.max_epochs or base[1]
    epochs = cfg.epochs or base[2]
    fine_tune = base[3] if cfg.fine_tune_epochs < 0 else cfg.fine_tune_epochs
    return n_trials, max_epochs, HParams(epochs=epochs, fine_tune_epochs=fine_tune)


def resolve_workers(cfg: PipelineConfig) -> int:
    """Processes that run the pipeline's steps (``pipeline.pool``).

    Auto means 2 for the synthetic demo and the ``cpu`` preset on a machine with two or more
    cores, 1 otherwise. One CPU training keeps about one core busy (most of a training step's
    kernels run one at a time), so two trainings side by side finish in about the time of one;
    workers sharing one GPU would each claim its memory.
    """
    import os

    workers = cfg.workers
    if workers == 0:
        cpu_run = resolve_preset(cfg).name in ("demo", "cpu")
        workers = 2 if cpu_run and (os.cpu_count() or 1) >= 2 else 1
    return workers


@functools.cache
def code_version() -> str:
    """A hash of the library's source, so a code change invalidates reused steps.

    Read once per process: a source edited while a pipeline runs (a checkout switched, a pull)
    must not give its later steps other keys than its earlier ones.
    """
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
        "storage": redact(cfg.storage),
        "model_name": cfg.model_name,
        "budget_gmacs": resolve_budget_gmacs(cfg),
    }
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:24]


def study_name(model: str, key: str) -> str:
    """The Optuna study of ``model``'s step ``key``; its final training (and a student of the
    same backbone) takes the best params from it."""
    return f"pipeline-{model}-{key[:8]}"
