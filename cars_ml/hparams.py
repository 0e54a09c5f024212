"""Training hyperparameters, kept apart from the training code so that configuring a run (the
pipeline process, argument checks) does not import TensorFlow."""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class HParams:
    """Training hyperparameters: the search space of ``tune`` pins or samples each of these."""

    epochs: int = 8
    fine_tune_epochs: int = 4
    batch_size: int = 32
    learning_rate: float = 1e-3
    fine_tune_learning_rate: float = 1e-4
    dropout: float = 0.3
    head_units: int = 0
    label_smoothing: float = 0.1
    unfreeze_fraction: float = 0.3
    augment_strength: float = 0.3
    weight_decay: float = 0.0
    patience: int = 3

    def __post_init__(self) -> None:
        checks = {
            "epochs": self.epochs >= 1,
            "fine_tune_epochs": self.fine_tune_epochs >= 0,
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
        }
        bad = [name for name, ok in checks.items() if not ok]
        if bad:
            values = ", ".join(f"{n}={getattr(self, n)}" for n in bad)
            raise ValueError(f"Invalid hyperparameters: {values} (see `--help` for valid ranges).")

    def as_params(self) -> dict[str, object]:
        return asdict(self)
