"""The pipeline's plan, pure: the budgets and worker count its config resolves to, each
backbone's study and final training as plain configs (:func:`make_plan`), and the keys that let
a finished step be reused (code version, parameters, dataset fingerprint)."""

from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import asdict, dataclass, replace
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
from cars_ml.training.config import TrainConfig
from cars_ml.training.hparams import HParams
from cars_ml.tuning.config import TuneConfig

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
    qat = HParams().qat_epochs if cfg.qat_epochs < 0 else cfg.qat_epochs
    return n_trials, max_epochs, HParams(epochs=epochs, fine_tune_epochs=fine_tune, qat_epochs=qat)


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


def resolve(cfg: PipelineConfig) -> PipelineConfig:
    """``cfg`` with its auto knobs resolved, so every step and step key sees the same values
    (resolving twice changes nothing)."""
    preset = resolve_preset(cfg)
    return replace(
        cfg,
        data=resolve_data(cfg),
        trial_fraction=resolve_trial_fraction(cfg),
        models=resolve_models(cfg),
        distill_students=resolve_students(cfg),
        preset=preset.name,
    )


@dataclass(frozen=True)
class Step:
    """One backbone's study and final training, and the key under which a finished one is
    reused. The pipeline run's id (their parent) is filled in when the step is queued."""

    model: str
    key: str
    tune: TuneConfig
    train: TrainConfig | None  # None: a study only, for a student that is no backbone here


@dataclass(frozen=True)
class Plan:
    """The whole pipeline as plain values, resolved once before anything runs."""

    cfg: PipelineConfig  # every auto knob resolved
    workers: int
    steps: tuple[Step, ...]

    def describe(self) -> list[str]:
        """The plan as lines for the console: knobs, then one line per backbone."""
        cfg, (n_trials, max_epochs, hparams) = self.cfg, resolve_budget(self.cfg)
        students = ", ".join(cfg.distill_students) or "every other backbone within the budgets"
        # Phase 3 follows fine-tuning only, so a run without fine-tuning has none.
        qat = hparams.qat_epochs if hparams.fine_tune_epochs else 0
        lines = [
            f"preset {cfg.preset}, {self.workers} worker(s); per backbone {n_trials} trials x "
            f"{max_epochs} epochs on {cfg.trial_fraction:.0%} of the training images, then "
            f"{hparams.epochs} head + {hparams.fine_tune_epochs} fine-tuning + {qat} "
            "quantization-aware epochs",
            f"data {cfg.data.data} (max_per_class {cfg.data.max_per_class or 'all'}), image_size "
            f"{'auto' if cfg.image_size == cars_ml.AUTO_SIZE else cfg.image_size}, weights "
            f"{cfg.weights}, budget_gmacs {resolve_budget_gmacs(cfg):g}",
            f"distil: {'into ' + students if cfg.distill else 'off'}",
        ]
        lines += [
            f"{s.model}: study {s.tune.study_name}, step key {s.key}"
            + ("" if s.train else " (study only: its hyperparameters for the student)")
            for s in self.steps
        ]
        return lines


def make_plan(cfg: PipelineConfig, fingerprint: str) -> Plan:
    """The plan of ``cfg`` on the dataset with ``fingerprint``: one step per backbone."""
    cfg = resolve(cfg)
    workers = resolve_workers(cfg)
    steps = tuple(
        _step(cfg, m, step_key(cfg, m, fingerprint), workers, train=m in cfg.models)
        for m in cfg.models + tuned_students(cfg)
    )
    return Plan(cfg, workers, steps)


def tuned_students(cfg: PipelineConfig) -> tuple[str, ...]:
    """Named students that are not backbones of the run: each gets a study of its own (head
    trials on cached features, cheap) but no training of its own, so it learns from the
    teacher with tuned hyperparameters without paying for a comparison model nobody asked for."""
    if not cfg.distill:
        return ()
    return tuple(s for s in cfg.distill_students if s not in cfg.models)


def _step(cfg: PipelineConfig, model: str, key: str, workers: int, train: bool) -> Step:
    """One backbone's study and (``train``) its final training on the study's best params. With
    several workers their lines interleave, so trials print one line each (no bar)."""
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
        progress_bar=workers == 1,
        # The trials' share of the final training's compute, as max_epochs is of its epochs.
        budget_gmacs=resolve_budget_gmacs(cfg) * max_epochs / hparams.epochs,
    )
    final = train_config(cfg, model, key, params_from=study) if train else None
    return Step(model, key, tune, final)


def train_config(cfg: PipelineConfig, model: str, key: str, **extra) -> TrainConfig:
    """The final training of ``model`` in this pipeline run (plain or, with ``extra``, a
    student's): the run's data, budget and seed."""
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
        budget_gmacs=resolve_budget_gmacs(cfg),
        **extra,
    )
