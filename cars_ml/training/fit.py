"""Two-phase transfer learning of a backbone + head on a dataset split (no MLflow, no Optuna).

Phase 1 trains a new head on the frozen backbone; phase 2 fine-tunes the top of the backbone
at a lower learning rate with BatchNorm frozen; an optional phase 3 goes on with int8 rounding
simulated, so that the int8 file changes fewer answers. With random initial weights a frozen
backbone is useless, so every layer trains from the first epoch in one phase.
"""

from __future__ import annotations

import functools
import logging
import weakref
from collections.abc import Sequence
from dataclasses import dataclass

import keras
import numpy as np
import tensorflow as tf
from sklearn.utils.class_weight import compute_class_weight

from cars_ml.data.pipeline import make_dataset
from cars_ml.data.types import DatasetSplits, ImageRecord
from cars_ml.export.tflite import MAX_REPRESENTATIVE
from cars_ml.modeling import backbones, quantization
from cars_ml.modeling.batchnorm import (
    BN_MOMENTUM_FROM_SCRATCH,
    MomentumWarmup,
    recalibrate_batchnorm,
    trainable_batchnorm,
)
from cars_ml.modeling.graph_build import use_grappler_for
from cars_ml.modeling.optimizers import FusedAdam
from cars_ml.training.callbacks import (
    EpochHook,
    EpochProgress,
    ValidationF1,
    WarmupStableDecay,
    scratch_schedule,
)
from cars_ml.training.distill import DistillationLoss, Teacher
from cars_ml.training.hparams import HParams, fine_tune_size

log = logging.getLogger(__name__)


@dataclass
class FitResult:
    """What training produced: the model to serve, its parts, and per-epoch history."""

    model: keras.Model  # pixels in, probabilities out; no optimizer attached
    backbone: keras.Model
    head: keras.Model
    history: list[dict[str, float]]
    training_mode: str
    best_val_f1_macro: float
    grappler: bool = True  # whether TensorFlow optimised the graphs (modeling.graph_build)
    train_size: int = 0  # pixels it trained at (it serves at its model's input size)


_INFERENCE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def inference_fn(model: keras.Model):
    """The model's compiled batch inference (float32 pixels in [0, 255]), traced once per model.

    Tracing a large backbone takes tens of seconds on a CPU, so every caller (per-epoch
    validation, evaluation, benchmark) shares one function with a batch-agnostic signature.
    """
    fn = _INFERENCE.get(model)
    if fn is None:
        size = model.input_shape[1]
        # Named like the input of the exported TFLite files, which start from this graph.
        spec = tf.TensorSpec([None, size, size, 3], tf.float32, name="image")
        fn = tf.function(lambda image: model(image, training=False), input_signature=[spec])
        _INFERENCE[model] = fn
    return fn


def predict_probabilities(model: keras.Model, data: tf.data.Dataset) -> np.ndarray:
    """Probabilities over a batched dataset through the model's compiled inference."""
    infer = inference_fn(model)
    outputs = [infer(batch[0] if isinstance(batch, tuple) else batch).numpy() for batch in data]
    return np.concatenate(outputs) if outputs else np.zeros((0, model.output_shape[-1]))


def labels_of(records: Sequence[ImageRecord]) -> np.ndarray:
    return np.array([r.label for r in records], dtype=np.int32)


def class_weights(labels: np.ndarray, num_classes: int) -> dict[int, float]:
    """Balanced class weights so rare classes count as much as common ones."""
    present = np.unique(labels)
    weights = compute_class_weight("balanced", classes=present, y=labels)
    result = dict.fromkeys(range(num_classes), 1.0)
    result.update({int(c): float(w) for c, w in zip(present, weights, strict=True)})
    return result


def _one_hot(num_classes: int):
    return lambda x, y: (x, tf.one_hot(y, num_classes))


def compile_for_training(
    model: keras.Model, optimizer: keras.optimizers.Optimizer, **kwargs
) -> None:
    """``model.compile`` plus the optimizer's variables, created now rather than in the trace.

    Without a distribution strategy Keras creates the optimizer's slots while tracing the first
    train step; a ``tf.function`` that creates variables is traced twice, so every model build
    would pay the slowest step of a CPU run twice (docs/performance.md).
    """
    model.compile(optimizer=optimizer, **kwargs)
    optimizer.build(model.trainable_variables)


def _compile(
    model: keras.Model,
    lr: float,
    smoothing: float,
    teacher: Teacher | None = None,
) -> None:
    if teacher is None:
        loss = keras.losses.CategoricalCrossentropy(label_smoothing=smoothing)
        metrics = [keras.metrics.CategoricalAccuracy(name="accuracy")]
    else:
        # The targets are the label and the teacher's probabilities side by side; the
        # validation callback scores the student, so no training metric is needed.
        loss = DistillationLoss(
            int(model.output_shape[-1]), teacher.temperature, teacher.alpha, smoothing
        )
        metrics = []
    compile_for_training(model, FusedAdam(lr), loss=loss, metrics=metrics)


# Fine-tuning warms its learning rate up over this many epochs, then decays it along a cosine.
FINE_TUNE_WARMUP_EPOCHS = 0.5
# Quantization-aware epochs start at this share of fine-tuning's peak learning rate: they
# adjust converged weights to int8 rounding rather than learn anew.
QAT_LEARNING_RATE_FACTOR = 0.1


@dataclass
class _Run:
    """What every phase of one ``fit`` shares: the graphs, the data and the callbacks."""

    model: keras.Model  # the graph that trains, compiled with the optimizer
    backbone: keras.Model
    hp: HParams
    train_ds: tf.data.Dataset
    num_train: int
    class_weights: dict[int, float]
    weights: dict[int, float] | None  # class weights for fit(), unless batches carry them
    f1_cb: ValidationF1
    teacher: Teacher | None
    extra_callbacks: Sequence[keras.callbacks.Callback]
    verbose: int | str

    def run_phase(
        self,
        epochs: int,
        lr: float,
        phase: str,
        *more: keras.callbacks.Callback,
        watch_from: int = 0,
    ) -> None:
        """``epochs`` more epochs of the whole graph at ``lr``, stopped early on val F1."""
        self.f1_cb.phase = phase
        _compile(self.model, lr, self.hp.label_smoothing, self.teacher)
        start = len(self.f1_cb.history)
        stop = keras.callbacks.EarlyStopping(
            monitor="val_f1_macro",
            mode="max",
            patience=self.hp.patience,
            restore_best_weights=True,
            start_from_epoch=start + watch_from,
        )
        progress = EpochProgress(self.num_train, start + epochs, phase)
        self.model.fit(
            self.train_ds,
            epochs=start + epochs,
            initial_epoch=start,
            class_weight=self.weights,
            callbacks=[progress, self.f1_cb, stop, *more, *self.extra_callbacks],
            verbose=0 if self.verbose in (0, 2) else self.verbose,
            shuffle=False,  # make_dataset shuffles; Keras warns that it cannot.
        )


def fit(
    splits: DatasetSplits,
    spec: backbones.BackboneSpec,
    image_size: int,
    backbone: keras.Model,
    weights_used: str,
    hp: HParams,
    *,
    seed: int = 42,
    epoch_hook: EpochHook | None = None,
    extra_callbacks: Sequence[keras.callbacks.Callback] = (),
    verbose: int | str = "auto",
    recalibrate: bool = True,
    teacher: Teacher | None = None,
) -> FitResult:
    """Train ``backbone`` + a new head on ``splits``; returns the best-weights model.

    A pretrained backbone trains a new head on its frozen features, then fine-tunes
    (``_fine_tune``), then optionally trains for its int8 file (``_quantization_aware``); a
    random one trains end to end (``_from_scratch``), after which the BatchNorm statistics are
    recalibrated (``recalibrate``; tuning trials skip it, being scored on their per-epoch
    validation macro-F1). With a ``teacher`` the student learns from its softened
    probabilities too (``cars_ml.training.distill``).
    """
    n = splits.num_classes
    _check_teacher(teacher, len(splits.train), n)
    keras.utils.set_random_seed(seed)
    # Before the run's first compiled call: TensorFlow reads the setting at every call.
    epochs = hp.epochs + hp.fine_tune_epochs + hp.qat_epochs
    grappler = use_grappler_for(-(-len(splits.train) // hp.batch_size) * epochs)
    pretrained = weights_used != "random"
    size = fine_tune_size(image_size, hp.train_scale, spec.min_size) if pretrained else image_size
    trained = backbone if size == image_size else _resized_copy(spec, backbone, size)
    head = backbones.build_head(
        trained.output_shape[-1], n, hp.dropout, hp.head_units, hp.weight_decay
    )
    model = backbones.build_classifier(spec, size, trained, head)
    classifier = _without_optimizer(model)
    weights = class_weights(labels_of(splits.train), n)
    val_ds = _batches(splits.val, size, hp, training=False)
    predict_val = functools.partial(predict_probabilities, classifier, val_ds)
    run = _Run(
        model=model,
        backbone=trained,
        hp=hp,
        train_ds=_train_batches(splits, size, hp, seed, teacher, weights),
        num_train=len(splits.train),
        class_weights=weights,
        weights=None if teacher else weights,
        f1_cb=ValidationF1(predict_val, labels_of(splits.val), epoch_hook, hp.label_smoothing),
        teacher=teacher,
        extra_callbacks=extra_callbacks,
        verbose=verbose,
    )
    mode = _phases(run, splits, size, seed, pretrained, recalibrate)
    if trained is not backbone:
        classifier = _at_serving_size(spec, image_size, backbone, trained, head)
    best = max((h["val_f1_macro"] for h in run.f1_cb.history), default=0.0)
    return FitResult(classifier, backbone, head, run.f1_cb.history, mode, best, grappler, size)


def _phases(run: _Run, splits, size: int, seed: int, pretrained: bool, recalibrate: bool) -> str:
    """Every phase of the fit; returns the training mode."""
    if not pretrained:
        return _from_scratch(run, splits, size, recalibrate)
    mode = _fine_tune(run)
    if mode == "two_phase" and run.hp.qat_epochs > 0:
        _quantization_aware(run, splits, size, seed)
    return mode


def _check_teacher(teacher: Teacher | None, num_train: int, num_classes: int) -> None:
    if teacher is not None and teacher.train_outputs.shape != (num_train, num_classes):
        raise ValueError(
            f"the teacher's answers have shape {teacher.train_outputs.shape}, not "
            f"({num_train}, {num_classes}): one row of class probabilities per training image; "
            "distil from a teacher trained on the same classes."
        )


def _without_optimizer(model: keras.Model) -> keras.Model:
    """The same layers without the optimizer that compile() attaches (a third of the saved
    bytes). Validation, evaluation, benchmark and export all run its one traced inference
    function."""
    return keras.Model(model.inputs, model.outputs, name=model.name)


def _at_serving_size(spec, image_size: int, backbone, trained, head) -> keras.Model:
    """The served model: the weights ``trained`` learnt, in ``backbone`` built at the serving
    size, under the same head."""
    backbone.set_weights(trained.get_weights())
    return _without_optimizer(backbones.build_classifier(spec, image_size, backbone, head))


def _resized_copy(spec: backbones.BackboneSpec, backbone: keras.Model, size: int) -> keras.Model:
    """The same backbone built for ``size`` px inputs, with ``backbone``'s weights (convolution
    and BatchNorm weights do not depend on the input size)."""
    copy, _ = backbones.build_backbone(spec, size, "none")
    copy.set_weights(backbone.get_weights())
    return copy


def _batches(records, image_size: int, hp: HParams, *, training: bool, **options):
    return make_dataset(
        records,
        image_size,
        hp.batch_size,
        training=training,
        augment_strength=hp.augment_strength if training else 0.0,
        **options,
    )


def _train_batches(
    splits, image_size, hp, seed, teacher, weights, training: bool = True
) -> tf.data.Dataset:
    """Training batches (shuffled and augmented unless ``training=False``) with one-hot labels;
    with a ``teacher``, the label and the teacher's probabilities side by side, and the class
    weights as sample weights (a class weight cannot be read off such a target)."""
    n = splits.num_classes
    if teacher is None:
        return _batches(splits.train, image_size, hp, training=training, shuffle_seed=seed).map(
            _one_hot(n)
        )
    per_class = tf.constant([weights[c] for c in range(n)], tf.float32)
    data = _batches(
        splits.train,
        image_size,
        hp,
        training=training,
        shuffle_seed=seed,
        targets=teacher.train_outputs,
    )
    return data.map(
        lambda x, y, taught: (
            x,
            tf.concat([tf.one_hot(y, n), taught], axis=1),
            tf.gather(per_class, y),
        )
    )


def _from_scratch(run: _Run, splits: DatasetSplits, image_size: int, recalibrate: bool) -> str:
    """Every layer, BatchNorm included, trains from the first epoch in one phase: random
    features are useless frozen."""
    hp = run.hp
    run.backbone.trainable = True
    # From scratch, BatchNorm's moving statistics must catch up within a short run: at the
    # default momentum (0.99) they stay near their initial values and inference collapses
    # to one constant prediction. A lower momentum, warmed up from the first step, lets
    # even a one-epoch tuning trial be scored on its own statistics.
    warmup = MomentumWarmup(trainable_batchnorm(run.backbone), BN_MOMENTUM_FROM_SCRATCH)
    total_epochs = hp.epochs + hp.fine_tune_epochs
    steps = -(-run.num_train // hp.batch_size)
    warmup_steps, watch_from = scratch_schedule(total_epochs, steps)
    lr = WarmupStableDecay(hp.learning_rate, total_epochs * steps, warmup_steps)
    run.run_phase(total_epochs, hp.learning_rate, "end_to_end", warmup, lr, watch_from=watch_from)
    if recalibrate:
        unaugmented = _train_batches(
            splits, image_size, hp, 0, run.teacher, run.class_weights, training=False
        )
        recalibrate_batchnorm(run.model, warmup, unaugmented, run.weights)
    return "end_to_end"


def _fine_tune(run: _Run) -> str:
    """Phase 1 trains the head alone on the frozen backbone; phase 2 fine-tunes the top
    ``unfreeze_fraction`` of the backbone with the head, BatchNorm frozen, with a short
    warm-up and a cosine decay of the learning rate.

    Both phases see augmented images. A head first trained to convergence on the frozen
    features (linear probing) left less for fine-tuning to gain on few photos per class
    (docs/real-data.md), so phase 1 only gives the head a start.
    """
    hp = run.hp
    run.backbone.trainable = False
    run.run_phase(hp.epochs, hp.learning_rate, "head")
    if hp.fine_tune_epochs == 0:
        return "head_only"
    unfrozen = backbones.set_fine_tune_layers(run.backbone, hp.unfreeze_fraction)
    log.info("Fine-tuning %d backbone layers (BatchNorm frozen)", unfrozen)
    steps = -(-run.num_train // hp.batch_size)
    schedule = WarmupStableDecay(
        hp.fine_tune_learning_rate,
        hp.fine_tune_epochs * steps,
        round(steps * FINE_TUNE_WARMUP_EPOCHS),
        decay_fraction=1.0,
    )
    run.run_phase(hp.fine_tune_epochs, hp.fine_tune_learning_rate, "fine_tune", schedule)
    return "two_phase"


def _quantization_aware(run: _Run, splits: DatasetSplits, size: int, seed: int) -> None:
    """Phase 3 trains the model's twin that rounds weights and activations as its int8 file
    will (``cars_ml.modeling.quantization``), at a tenth of phase 2's peak learning rate along
    a cosine, so that fewer answers change when the model is quantized. The twin shares the
    model's layers; validation scores the float model."""
    hp = run.hp
    # As many images as the export calibrates on.
    pick = np.random.default_rng(seed).permutation(len(splits.train))[:MAX_REPRESENTATIVE]
    calibration = _batches([splits.train[i] for i in pick], size, hp, training=False)
    twin = quantization.twin(run.model)
    points = quantization.calibrate(twin, calibration)
    log.info("Quantization-aware fine-tuning: %d int8 rounding points", points)
    lr = hp.fine_tune_learning_rate * QAT_LEARNING_RATE_FACTOR
    steps = -(-run.num_train // hp.batch_size)
    schedule = WarmupStableDecay(lr, hp.qat_epochs * steps, 0, decay_fraction=1.0)
    run.model = twin
    run.run_phase(hp.qat_epochs, lr, "quantize", schedule)
