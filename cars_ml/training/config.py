"""The ``train`` and ``distill`` steps' configuration: each field is also their parameter.

Kept apart from the training code so that an entry point builds its parser, and a pipeline
its plan, without importing MLflow or TensorFlow.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import cars_ml
from cars_ml.data.types import DataConfig
from cars_ml.modeling import backbones, distribute
from cars_ml.params import (
    auto_or,
    nested,
    non_negative_float,
    non_negative_int,
    param,
    positive_float,
)
from cars_ml.training.hparams import (
    DEFAULT_ALPHA,
    DEFAULT_TEMPERATURE,
    HParams,
    check_distill_params,
)

# ``auto`` (the backbone's native size for real data, a small one for synthetic), 0 or pixels.
image_size_param = auto_or(non_negative_int, cars_ml.AUTO_SIZE)
IMAGE_SIZE_HELP = "auto, 0 = the backbone's native size, or pixels"
WEIGHTS_HELP = "auto, imagenet, none or a weights file"


@dataclass(frozen=True)
class TrainConfig:
    """Everything the ``train`` entry point controls."""

    model: str = param("mobilenet", "backbone name")
    data: DataConfig = nested(
        DataConfig,
        only=("data", "seed", "crop_to_bbox", "skip_bad_images", "max_classes", "max_per_class"),
    )
    weights: str = param("auto", WEIGHTS_HELP)
    image_size: int = param(cars_ml.AUTO_SIZE, IMAGE_SIZE_HELP, parse=image_size_param, text="auto")
    hparams: HParams = nested(HParams)
    seed: int = param(
        42, "seed of the split, the sampling and the training", parse=non_negative_int
    )
    register: bool = param(True, "register the model in the MLflow registry")
    model_name: str = param(cars_ml.REGISTERED_MODEL_NAME, "registered model name")
    export_tflite: bool = param(True, "export and measure float32 and int8 TFLite files")
    benchmark_runs: int = 50
    params_from: str = param("", "an Optuna study name to take hyperparameters from")
    storage: str = param("", "Optuna storage URL of that study")
    run_name: str = ""
    run_tags: dict[str, str] = field(default_factory=dict)
    parent_run_id: str = ""  # make the run a child of this run (the pipeline's)
    verbose: int | str = "auto"
    devices: str = param(
        "auto", "tf.distribute: auto mirrors across several local GPUs", choices=distribute.MODES
    )
    # Knowledge distillation (``cars_ml.training.distill``): a registered teacher's URI turns the
    # run into a student's; ``alpha`` weighs the true labels, ``1 - alpha`` the teacher.
    teacher: str = param(
        "",
        "the teacher's registered model URI: models:/<name>/<version> or models:/<name>@<alias>",
    )
    temperature: float = param(
        DEFAULT_TEMPERATURE,
        "softens both models' probabilities in the distillation loss",
        parse=positive_float,
    )
    alpha: float = param(
        DEFAULT_ALPHA,
        "weight of the true-label loss; 1 - alpha goes to the teacher's soft targets",
        parse=float,
    )
    budget_gmacs: float = param(
        0.0,
        "training compute per image in GMACs: epochs by cost (0 = off: epochs as given)",
        parse=non_negative_float,
    )
    # Fine-grained evaluation (``cars_ml.training.slices``): a CSV mapping class to group; empty
    # reads make and body type from Stanford Cars-like names (other names: no slices).
    slices: str = param(
        "", "CSV mapping class to group for slice metrics (empty: make/body type from names)"
    )

    def __post_init__(self) -> None:
        check_distill_params(self.temperature, self.alpha)
        if not (self.budget_gmacs >= 0):
            raise ValueError(f"budget_gmacs must be >= 0 (0 = off), got {self.budget_gmacs}.")
        if self.devices == "multi_worker":
            raise ValueError(distribute.MULTI_WORKER_BLOCKED)
        if self.devices not in distribute.MODES:
            raise ValueError(
                f"devices={self.devices!r} is not one of {', '.join(distribute.MODES)}."
            )
        spec = backbones.get_backbone(self.model)
        backbones.resolve_image_size(spec, self.image_size)
        backbones.validate_weights(self.weights)
        if self.benchmark_runs < 1:
            raise ValueError(f"benchmark_runs must be >= 1, got {self.benchmark_runs}")
