"""The ``main`` pipeline's configuration (each field also its parameter) and the presets that
fill its auto knobs. No MLflow here: the entry point builds its parser from it at once."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import cars_ml
from cars_ml import PRESET_CHOICES
from cars_ml.data.types import DataConfig
from cars_ml.modeling import backbones
from cars_ml.params import (
    auto_or,
    comma_list,
    fraction,
    integer,
    nested,
    non_negative_float,
    non_negative_int,
    param,
    positive_float,
)
from cars_ml.promotion.config import PromotionConfig
from cars_ml.training.config import IMAGE_SIZE_HELP, WEIGHTS_HELP, image_size_param
from cars_ml.training.hparams import DEFAULT_ALPHA, DEFAULT_TEMPERATURE, check_distill_params

_AUTO = "0 = auto: a small demo budget on synthetic data, a full one on real data"


@dataclass(frozen=True)
class PipelineConfig:
    """The whole comparison. ``preset`` sets every auto (0 / -1 / empty) knob: ``demo`` for
    the synthetic data, ``cpu`` or ``full`` for real data (``PRESETS``)."""

    models: tuple[str, ...] = param(
        (),
        "comma-separated backbones; empty = the preset's (the seven original ones on synthetic "
        "data, EfficientNet-Lite2 with preset cpu)",
        parse=comma_list,
    )
    data: DataConfig = nested(DataConfig, only=("data", "seed", "max_per_class"))
    preset: str = param(
        "auto",
        "the auto knobs: demo (synthetic data), cpu (real data within 90 minutes on 2 cores), "
        "full (real data on a GPU); auto = demo on synthetic data, else full with a GPU and cpu "
        "without",
        choices=PRESET_CHOICES,
    )
    n_trials: int = param(0, f"trials per backbone; {_AUTO}", parse=non_negative_int)
    max_epochs: int = param(0, f"epochs per trial; {_AUTO}", parse=non_negative_int)
    storage: str = param("", "Optuna storage URL (empty: SQLite beside mlflow.db)")
    image_size: int = param(cars_ml.AUTO_SIZE, IMAGE_SIZE_HELP, parse=image_size_param, text="auto")
    weights: str = param("auto", WEIGHTS_HELP)
    epochs: int = param(0, f"final head epochs; {_AUTO}", parse=non_negative_int)
    fine_tune_epochs: int = param(-1, "final fine-tuning epochs; -1 = auto", parse=integer)
    qat_epochs: int = param(
        -1,
        "final quantization-aware epochs after fine-tuning; -1 = auto (train's default)",
        parse=integer,
    )
    promotion: PromotionConfig = nested(
        PromotionConfig, only=("max_latency_ms", "max_size_mb", "max_int8_f1_drop")
    )
    model_name: str = cars_ml.REGISTERED_MODEL_NAME
    reuse: bool = param(True, "reuse steps with the same inputs")
    seed: int = param(
        42, "seed of the split, the sampling and the training", parse=non_negative_int
    )
    workers: int = param(
        0,
        "processes that tune and train backbones side by side; 0 = auto (2 on synthetic data, "
        "else 1)",
        parse=non_negative_int,
    )
    trial_fraction: float = param(
        0.0,
        "share of the training images each trial trains on; 0 = auto (half on synthetic data, "
        "all on real data)",
        parse=fraction,
    )
    # Training compute per image of each final training, in GMACs: epochs by cost
    # (hparams.epochs_for_budget). -1 = auto: DEMO_BUDGET_GMACS on synthetic data, off on real.
    budget_gmacs: float = param(
        -1.0,
        "training compute per image in GMACs for every final training (epochs by cost); auto: "
        "2.5 on synthetic data, off (0) on real data",
        parse=auto_or(non_negative_float, -1.0),
        text="auto",
    )
    # Distil the run's best model into the backbones that pass the edge budgets (or into
    # ``distill_students``) after every backbone has trained.
    distill: bool = param(
        True, "distil the run's best model into the backbones within the edge budgets"
    )
    distill_students: tuple[str, ...] = param(
        (),
        "comma-separated students instead of those within the budgets (empty = the preset's: "
        "EfficientNet-Lite0 with preset cpu); one that is not in models gets a study but no "
        "training of its own",
        parse=comma_list,
    )
    temperature: float = param(
        DEFAULT_TEMPERATURE, "the students' distillation temperature", parse=positive_float
    )
    alpha: float = param(
        DEFAULT_ALPHA, "weight of the true labels in the students' loss", parse=fraction
    )
    dry_run: bool = param(
        False, "print the plan (resolved knobs, each backbone's study and step key) and stop"
    )

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
        preset = resolve_preset(self)
        for name in (self.models or preset.models) + (self.distill_students or preset.students):
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
        # Real data on a CPU: the larger ImageNet-pretrained edge backbone that installs offline
        # as teacher of the smaller, within 90 minutes for 4,000 photos on 2 cores
        # (docs/real-data.md). The student gets a study but no plain training of its own: on
        # cores where one training keeps both busy, every model trained adds its whole time. A
        # backbone without ImageNet weights here (MobileNet) would learn from scratch, near
        # chance on so few photos, for most of the budget.
        Preset(
            "cpu",
            ("efficientnet_lite2",),
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
