"""The Keras callbacks of a ``fit``: validation F1 each epoch, the progress line, and the
from-scratch learning-rate schedule (no MLflow, no Optuna)."""

from __future__ import annotations

import time
from collections.abc import Callable

import keras
import numpy as np

from cars_ml.training.evaluate import cross_entropy, macro_f1

# Called after each epoch with its number and its row (losses, validation scores, images/s).
EpochHook = Callable[[int, dict[str, float]], None]


class ValidationF1(keras.callbacks.Callback):
    """Adds ``val_f1_macro`` to the epoch logs (for early stopping, pruning and MLflow).

    ``predict()`` returns the validation probabilities of the model as it stands: the served
    classifier on images, or the head alone on cached features while only the head trains.
    """

    def __init__(
        self,
        predict: Callable[[], np.ndarray],
        val_labels: np.ndarray,
        hook: EpochHook | None,
        smoothing: float = 0.0,
    ):
        super().__init__()
        self.predict = predict
        self.val_labels = val_labels
        self.smoothing = smoothing
        self.hook = hook
        self.phase = "head"
        self.history: list[dict[str, float]] = []

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        logs = logs if logs is not None else {}
        # One compiled forward pass gives F1, accuracy and loss; Keras' own validation would
        # trace a second graph of the whole network.
        probs = self.predict()
        logs["val_f1_macro"] = macro_f1(self.val_labels, probs)
        logs["val_accuracy"] = float(np.mean(probs.argmax(axis=1) == self.val_labels))
        logs["val_loss"] = cross_entropy(self.val_labels, probs, self.smoothing)
        row = {
            "epoch": len(self.history),
            "phase": self.phase,
            "train_loss": float(logs.get("loss", np.nan)),
            "val_loss": float(logs.get("val_loss", np.nan)),
            "val_accuracy": float(logs.get("val_accuracy", np.nan)),
            "val_f1_macro": logs["val_f1_macro"],
        }
        if "train_images_per_s" in logs:
            row["train_images_per_s"] = float(logs["train_images_per_s"])
        self.history.append(row)
        if self.hook:
            self.hook(row["epoch"], row)


class EpochProgress(keras.callbacks.Callback):
    """Times each epoch: adds ``train_images_per_s`` to its logs and, once the other callbacks
    have scored it, prints one line with the loss, validation F1, images/s and the phase's ETA.

    Listed first, so its ``on_epoch_end`` measures before validation runs; the line is printed
    at the next epoch's start or the phase's end, when every callback has filled the logs.
    """

    def __init__(self, images_per_epoch: int, last_epoch: int, label: str = "train"):
        super().__init__()
        self.images = images_per_epoch
        self.last_epoch = last_epoch
        self.label = label
        self.seconds: list[float] = []
        self.pending: tuple[int, dict] | None = None

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        self._print()
        self.started = time.perf_counter()

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        self.seconds.append(time.perf_counter() - self.started)
        if logs is not None:
            logs["train_images_per_s"] = self.images / self.seconds[-1]
            self.pending = (epoch, logs)

    def on_train_end(self, logs: dict | None = None) -> None:
        self._print()

    def _print(self) -> None:
        if self.pending is None:
            return
        epoch, logs = self.pending
        self.pending = None
        left = (self.last_epoch - epoch - 1) * float(np.mean(self.seconds))
        print(
            f"[{self.label}] epoch {epoch + 1}/{self.last_epoch}: loss {logs.get('loss', np.nan):.4f}"
            f"  val_f1_macro {logs.get('val_f1_macro', np.nan):.4f}"
            f"  {logs['train_images_per_s']:.1f} img/s  {self.seconds[-1]:.0f} s"
            f"  ETA {left / 60:.1f} min",
            flush=True,
        )


# Share of a from-scratch run over which the learning rate decays to zero.
DECAY_FRACTION = 1 / 3


class WarmupStableDecay(keras.callbacks.Callback):
    """Learning rate: linear warm-up over ``warmup_steps``, constant, then a cosine decay to zero
    over the last ``decay_fraction`` of the steps.

    Training from scratch, a constant rate is too high for the first steps (random BatchNorm
    statistics, large gradients) and too high again at the end, where it keeps the weights
    jittering instead of settling. Decaying over the whole run instead halves the average rate,
    which starves short runs (VGG16 in two demo epochs: test macro-F1 0.02 with a full cosine).
    The rate is the optimizer's variable, set before each step, so the traced train step is not
    traced again.
    """

    def __init__(
        self,
        base_lr: float,
        total_steps: int,
        warmup_steps: int,
        decay_fraction: float = DECAY_FRACTION,
    ):
        super().__init__()
        self.base_lr = float(base_lr)
        self.total_steps = max(1, int(total_steps))
        self.warmup_steps = max(0, min(int(warmup_steps), self.total_steps - 1))
        decay = max(1, round(self.total_steps * decay_fraction))
        self.decay_start = max(self.warmup_steps, self.total_steps - decay)
        self.step = 0

    def rate(self, step: int) -> float:
        if step < self.warmup_steps:
            return self.base_lr * (step + 1) / (self.warmup_steps + 1)
        if step < self.decay_start:
            return self.base_lr
        span = max(1, self.total_steps - self.decay_start)
        progress = min(1.0, (step - self.decay_start) / span)
        return self.base_lr * 0.5 * (1.0 + np.cos(np.pi * progress))

    def on_train_batch_begin(self, batch: int, logs: dict | None = None) -> None:
        self.model.optimizer.learning_rate.assign(self.rate(self.step))
        self.step += 1


def scratch_schedule(total_epochs: int, steps_per_epoch: int) -> tuple[int, int]:
    """``(warmup_steps, first epoch early stopping watches)`` of a from-scratch run.

    The warm-up is the first epoch (at most a tenth of the run). Early stopping watches from
    the epoch the decay starts (``WarmupStableDecay``): before it the validation score of a
    network trained from scratch is noisy and still to gain most from the decay, and stopping
    there keeps an unsettled model.
    """
    total = total_epochs * steps_per_epoch
    return min(steps_per_epoch, total // 10), total_epochs - round(total_epochs * DECAY_FRACTION)
