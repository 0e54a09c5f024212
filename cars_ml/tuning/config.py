"""The ``tune`` step's configuration: each field is also its parameter.

Kept apart from the tuning code so that an entry point builds its parser without importing
Optuna, MLflow or TensorFlow.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import cars_ml
from cars_ml.data.types import DataConfig
from cars_ml.modeling import backbones
from cars_ml.params import (
    fraction,
    nested,
    non_negative_float,
    non_negative_int,
    param,
    positive_int,
)
from cars_ml.training.config import IMAGE_SIZE_HELP, WEIGHTS_HELP, image_size_param

if TYPE_CHECKING:
    import optuna

PRUNERS = ("median", "hyperband", "none", "threshold:<min val_f1_macro>")
OBJECTIVES = {"f1": "maximize", "latency": "minimize"}


def parse_pins(text: str) -> tuple[tuple[str, Any], ...]:
    """``dropout=0.2,head_units=256`` as ``(name, value)`` pairs (the search space checks them)."""
    if not str(text).strip():
        return ()
    from cars_ml.tuning.search_space import parse_pins as parse

    return tuple(parse(text).items())


@dataclass(frozen=True)
class TuneConfig:
    """Everything the ``tune`` entry point controls (budget knobs included)."""

    model: str = param("mobilenet", "backbone name")
    data: DataConfig = nested(DataConfig, only=("data", "seed", "max_per_class", "max_classes"))
    n_trials: int = param(10, "trials for this worker", parse=positive_int)
    timeout_s: float = param(
        0.0, "stop after this many seconds (0: none)", parse=non_negative_float
    )
    storage: str = param("", "Optuna storage URL (empty: SQLite beside mlflow.db)")
    study_name: str = param("", "empty: <model>-<data>-<size>px")
    pruner: str = param("median", "median, hyperband, none or threshold:X")
    objectives: str = param("f1", "f1, or f1,latency for NSGA-II")
    image_size: int = param(cars_ml.AUTO_SIZE, IMAGE_SIZE_HELP, parse=image_size_param, text="auto")
    weights: str = param("auto", WEIGHTS_HELP)
    seed: int = param(
        42, "seed of the split, the sampling and the training", parse=non_negative_int
    )
    max_epochs: int = param(5, "epochs per trial", parse=positive_int)
    fine_tune_epochs: int = param(
        0,
        "fine-tune epochs per trial (>0 trains end to end, no feature cache)",
        parse=non_negative_int,
    )
    # Trials train on this stratified fraction of the training split (validation stays whole):
    # a cheaper ranking of hyperparameters; the final training always uses every image.
    trial_fraction: float = param(
        1.0, "stratified share of the training images each trial trains on", parse=fraction
    )
    cached_features: bool = param(True, "train head-only trials on cached backbone features")
    pins: tuple[tuple[str, object], ...] = param(
        (), "pinned params, e.g. dropout=0.2,head_units=256", parse=parse_pins, text="", name="pin"
    )
    latency_runs: int = 20
    parent_run_id: str = ""  # nest this worker's parent run under another run (the pipeline's)
    # True: n_trials is the study's total over every worker (this one stops when the study has
    # that many); False: this worker runs n_trials more.
    study_total: bool = False
    progress_bar: bool = True  # off where several processes share one terminal
    # A registered teacher's URI makes this a distillation study: every trial trains the student
    # end to end on the teacher's outputs, and temperature and alpha join the search space.
    teacher: str = param(
        "",
        "a registered teacher (models:/<name>/<version>): a distillation study that also "
        "searches temperature and alpha",
    )
    # Training compute per image of a trial trained end to end, in GMACs (0 = off): a cheap
    # backbone's trials train for more than max_epochs (hparams.epochs_for_budget), so that they
    # rank hyperparameters for a run as long as its final training.
    budget_gmacs: float = param(
        0.0,
        "training compute per image of a trial in GMACs: cheap backbones' trials train for "
        "more than max_epochs (0 = off)",
        parse=non_negative_float,
    )

    def __post_init__(self) -> None:
        backbones.get_backbone(self.model)
        backbones.validate_weights(self.weights)
        if self.n_trials < 1:
            raise ValueError(f"n_trials must be >= 1, got {self.n_trials}.")
        if self.timeout_s < 0:
            raise ValueError(f"timeout_s must be >= 0 (0 = no limit), got {self.timeout_s}.")
        if self.max_epochs < 1:
            raise ValueError(f"max_epochs must be >= 1, got {self.max_epochs}.")
        if not 0.0 < self.trial_fraction <= 1.0:
            raise ValueError(
                f"trial_fraction must be in (0, 1] (1 = every training image), "
                f"got {self.trial_fraction}."
            )
        make_pruner(self.pruner, self.max_epochs)
        unknown = [o for o in self.objective_names if o not in OBJECTIVES]
        if unknown or not self.objective_names or self.objective_names[0] != "f1":
            raise ValueError(
                f"objectives={self.objectives!r} is not valid; use 'f1' or 'f1,latency'."
            )

    @property
    def objective_names(self) -> list[str]:
        return [o.strip() for o in self.objectives.split(",") if o.strip()]


def make_pruner(spec: str, max_epochs: int) -> optuna.pruners.BasePruner:
    """median, hyperband, none, or threshold:X (prune a trial whose F1 falls below X)."""
    import optuna

    if spec == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=1)
    if spec == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=max_epochs)
    if spec == "none":
        return optuna.pruners.NopPruner()
    if spec.startswith("threshold:"):
        try:
            return optuna.pruners.ThresholdPruner(lower=float(spec.split(":", 1)[1]))
        except ValueError:
            pass
    raise ValueError(f"Unknown pruner {spec!r}; choose one of {', '.join(PRUNERS)}.")
