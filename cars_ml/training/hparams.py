"""Training hyperparameters, kept apart from the training code so that configuring a run (the
pipeline process, argument checks) does not import TensorFlow."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from cars_ml.params import (
    fraction,
    non_negative_float,
    non_negative_int,
    param,
    positive_float,
    positive_int,
)

# Hinton et al. used temperatures 2-20; 4 and an even mix of the two losses are the usual start.
DEFAULT_TEMPERATURE = 4.0
DEFAULT_ALPHA = 0.5


def check_distill_params(temperature: float, alpha: float) -> None:
    """Refuse a temperature <= 0 and an alpha outside [0, 1], naming the fix."""
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(
            f"temperature={temperature} must be > 0; softened targets need a positive "
            f"temperature (try {DEFAULT_TEMPERATURE})."
        )
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(
            f"alpha={alpha} must be between 0 and 1: it is the weight of the true-label loss "
            f"(1 - alpha goes to the teacher's soft targets; try {DEFAULT_ALPHA})."
        )


@dataclass(frozen=True)
class HParams:
    """Training hyperparameters: the search space of ``tune`` pins or samples each of these."""

    epochs: int = param(2, "phase 1: epochs of the head alone", parse=positive_int)
    fine_tune_epochs: int = param(
        12, "phase 2: epochs of the head with the backbone's top", parse=non_negative_int
    )
    qat_epochs: int = param(
        2,
        "phase 3: epochs of fine-tuning with int8 rounding simulated (0: off)",
        parse=non_negative_int,
    )
    batch_size: int = param(32, parse=positive_int)
    learning_rate: float = param(1e-3, "phase 1's learning rate", parse=positive_float)
    fine_tune_learning_rate: float = param(
        3e-4, "phase 2's peak learning rate (warm-up, cosine decay)", parse=positive_float
    )
    dropout: float = param(0.3, "dropout before the classifier", parse=fraction)
    head_units: int = param(0, "hidden units in the head (0: none)", parse=non_negative_int)
    label_smoothing: float = param(0.1, parse=fraction)
    unfreeze_fraction: float = param(
        0.6, "share of the backbone's layers that phase 2 trains", parse=fraction
    )
    augment_strength: float = param(
        1.0, "random resized crop, flip and colour change (0: none)", parse=fraction
    )
    weight_decay: float = param(0.0, parse=non_negative_float)
    patience: int = param(
        3, "epochs without a better val_f1_macro before stopping", parse=positive_int
    )
    # Fine-tuning a pretrained backbone trains at this share of image_size and serves at
    # image_size: random crops show cars larger than whole photos do, so a model trained on
    # smaller images sees them at the size it is served them (and trains faster).
    train_scale: float = param(
        0.86,
        "fine-tuning trains at this share of image_size and serves at image_size (1 = off)",
        parse=fraction,
    )

    def __post_init__(self) -> None:
        checks = {
            "epochs": self.epochs >= 1,
            "fine_tune_epochs": self.fine_tune_epochs >= 0,
            "qat_epochs": self.qat_epochs >= 0,
            "batch_size": self.batch_size >= 1,
            "learning_rate": self.learning_rate > 0,
            "fine_tune_learning_rate": self.fine_tune_learning_rate > 0,
            "dropout": 0.0 <= self.dropout < 1.0,
            "head_units": self.head_units >= 0,
            "label_smoothing": 0.0 <= self.label_smoothing < 1.0,
            "unfreeze_fraction": 0.0 <= self.unfreeze_fraction <= 1.0,
            "augment_strength": 0.0 <= self.augment_strength <= 1.0,
            "weight_decay": self.weight_decay >= 0.0,
            "patience": self.patience >= 1,
            "train_scale": 0.25 <= self.train_scale <= 1.0,
        }
        bad = [name for name, ok in checks.items() if not ok]
        if bad:
            values = ", ".join(f"{n}={getattr(self, n)}" for n in bad)
            raise ValueError(f"Invalid hyperparameters: {values} (see `--help` for valid ranges).")

    def as_params(self) -> dict[str, object]:
        return asdict(self)


# A compute budget buys at most this many times the configured epochs: the cheapest backbones
# (MobileNetV3-Small costs a hundredth of Inception-ResNet-v2) would otherwise train for
# hundreds of epochs, long after they converged.
BUDGET_MAX_EPOCH_FACTOR = 10
# A training step costs about three forward passes: the forward pass and a backward pass that
# computes gradients for both activations and weights.
TRAIN_COST_PER_FORWARD = 3.0


def epochs_for_budget(budget_gmacs: float, forward_gmacs: float, epochs: int) -> int:
    """Epochs that ``budget_gmacs`` of training compute per image buys a model whose forward
    pass costs ``forward_gmacs`` per image: at least ``epochs``, at most
    ``BUDGET_MAX_EPOCH_FACTOR`` times it. A budget of 0 switches this off (``epochs``).

    Equal compute instead of equal epochs: a cheap edge backbone trains until it converges in
    the time an expensive one needs for a few epochs.
    """
    if budget_gmacs < 0 or forward_gmacs < 0:
        raise ValueError(
            f"budget_gmacs={budget_gmacs} and forward_gmacs={forward_gmacs} must be >= 0 "
            "(budget 0 switches the compute budget off)."
        )
    if budget_gmacs == 0 or forward_gmacs == 0:
        return epochs
    bought = int(budget_gmacs // (TRAIN_COST_PER_FORWARD * forward_gmacs))
    return max(epochs, min(bought, BUDGET_MAX_EPOCH_FACTOR * epochs))


def fine_tune_size(image_size: int, train_scale: float, min_size: int) -> int:
    """The size a pretrained backbone fine-tunes at to be served at ``image_size``: a multiple
    of 8 near ``train_scale * image_size``, at least ``min_size``, at most ``image_size``."""
    size = int(round(image_size * train_scale / 8.0)) * 8
    return min(image_size, max(min_size, size))
