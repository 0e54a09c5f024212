"""The pipeline's plan, pure: its config, the budgets and worker count it resolves to, and the
keys that let a finished step be reused (code version, parameters, dataset fingerprint)."""

from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import cars_ml
from cars_ml import PRESET_CHOICES
from cars_ml.data import DataConfig
from cars_ml.modeling import backbones
from cars_ml.promotion.policy import PromotionConfig
from cars_ml.tracking.redaction import redact
from cars_ml.training.hparams import (
    DEFAULT_ALPHA,
    DEFAULT_TEMPERATURE,
    HParams,
    check_distill_params,
)


@dataclass(frozen=True)
class PipelineConfig:
    """The whole comparison. ``preset`` sets every auto (0 / -1 / empty) knob: ``demo`` for
    the synthetic data, ``cpu`` or ``full`` for real data (``PRESETS``)."""

    models: tuple[str, ...] = ()  # empty = the preset's backbones
    data: DataConfig = field(default_factory=DataConfig)
    preset: str = "auto"
    n_trials: int = 0  # 0 = auto: the preset's
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
        if self.preset not in PRESET_CHOICES:
            raise ValueError(f"preset={self.preset!r} is not one of {', '.join(PRESET_CHOICES)}.")
        if self.preset == "demo" and self.data.data != "synthetic":
            raise ValueError(
                "preset=demo is the synthetic data's budget; on real data use preset=cpu "
                "(a 2-core machine) or preset=full (a GPU), or auto to choose by hardware."
            )
        if not 0.0 <= self.trial_fraction <= 1.0:
            raise ValueError(
                f"trial_fraction must be in [0, 1] (0 = auto), got {self.trial_fraction}."
            )
        if self.workers < 0:
            raise ValueError(f"workers must be >= 0 (0 = auto), got {self.workers}.")
        for name in self.models or resolve_preset(self).models:
            # Every backbone's image size is checked now, not after earlier backbones trained.
            backbones.resolve_image_size(backbones.get_backbone(name), self.image_size)
        backbones.validate_weights(self.weights)


@dataclass(frozen=True)
class Preset:
    """The auto knobs of one kind of run: its backbones, trials and epochs."""

    name: str
    models: tuple[str, ...]
    n_trials: int
    max_epochs: int  # per tuning trial
    epochs: int  # final training: the head alone (or end to end from random weights)
    fine_tune_epochs: int
    students: tuple[str, ...] = ()  # empty: every other backbone within the edge budgets

    @property
    def budget(self) -> tuple[int, int, int, int]:
        return self.n_trials, self.max_epochs, self.epochs, self.fine_tune_epochs


LITE_BACKBONES = ("efficientnet_lite2", "efficientnet_lite1", "efficientnet_lite0")
PRESETS = {
    p.name: p
    for p in (
        # The synthetic demo: every original backbone in about ten minutes on 2 cores.
        Preset("demo", backbones.ORIGINAL_BACKBONES, 2, 1, 2, 0),
        # Real data on a CPU: the ImageNet-pretrained edge backbones that install offline, the
        # larger one as teacher of the smaller, within 90 minutes for 4,000 photos on 2 cores
        # (docs/real-data.md). A backbone without ImageNet weights here (MobileNet) would learn
        # from scratch, near chance on so few photos, for most of the budget.
        Preset(
            "cpu",
            ("efficientnet_lite2", "efficientnet_lite0"),
            10,
            5,
            2,
            12,
            students=("efficientnet_lite0",),
        ),
        # Real data on a GPU: every backbone at its native size, with a full study each.
        Preset("full", backbones.ORIGINAL_BACKBONES + LITE_BACKBONES, 20, 5, 2, 15),
    )
}
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


def has_gpu() -> bool:
    """Whether an NVIDIA GPU is visible, without starting TensorFlow (the pipeline's own
    process never needs it)."""
    import shutil

    return shutil.which("nvidia-smi") is not None and Path("/dev/nvidia0").exists()


def resolve_preset(cfg: PipelineConfig) -> Preset:
    """``demo`` on the synthetic data; on real data the one asked for, or with ``auto``
    ``full`` where a GPU is visible and ``cpu`` elsewhere."""
    if cfg.data.data == "synthetic":
        return PRESETS["demo"]
    if cfg.preset in PRESETS:
        return PRESETS[cfg.preset]
    return PRESETS["full" if has_gpu() else "cpu"]


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
