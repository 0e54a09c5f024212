"""Tuning: seconds per head trial on cached backbone features vs through the backbone.

Both trials run the ``tune`` step's own code (``Objective.train_head`` and ``train_full``)
with one fixed set of hyperparameters, on the same images, with a frozen backbone whose
weights come from a file, so the product treats it as pretrained.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from cars_ml.data.types import DatasetSplits, ImageRecord

# One trial's hyperparameters, inside the search space (search_space.SEARCH_SPACE).
TRIAL_PARAMS = {
    "learning_rate": 1e-3,
    "dropout": 0.3,
    "head_units": 0,
    "label_smoothing": 0.1,
    "batch_size": 32,
    "weight_decay": 1e-5,
    "fine_tune_learning_rate": 1e-4,
    "unfreeze_fraction": 0.3,
    "augment_strength": 0.3,
}


def benchmark_splits(
    records: Sequence[ImageRecord], class_names: Sequence[str], root: str, val_every: int = 5
) -> DatasetSplits:
    """Train/val splits of ``records`` (every ``val_every``-th image validates); no test set."""
    if len(records) < 2 * val_every:
        raise ValueError(
            f"tuning needs at least {2 * val_every} images, got {len(records)}; raise pipeline_images."
        )
    val = tuple(r for i, r in enumerate(records) if i % val_every == val_every - 1)
    train = tuple(r for i, r in enumerate(records) if i % val_every != val_every - 1)
    return DatasetSplits(
        name="benchmark",
        layout="stanford_cars",
        root=root,
        class_names=tuple(class_names),
        train=train,
        val=val,
        test=(),
        test_source="held_out",
        fingerprint="benchmark",
    )


def _quiet_objective(cfg, splits, spec, size: int, weights_used: str, features):
    """The tune step's objective with its per-epoch hook silenced.

    The hook logs ``val_f1_macro`` to the active MLflow run and reports to Optuna; here the
    active run is the benchmark's, which must only carry benchmark figures.
    """
    from cars_ml.tuning.objective import Objective

    class QuietObjective(Objective):
        def epoch_hook(self, trial):
            return lambda epoch, row: None

    return QuietObjective(cfg, splits, spec, size, weights_used, features)


def compare_tuning(
    records: Sequence[ImageRecord],
    class_names: Sequence[str],
    root: str,
    workdir: Path,
    *,
    image_size: int = 224,
    epochs: int = 1,
    cached_trials: int = 3,
    seed: int = 42,
) -> dict[str, float]:
    """Median seconds of ``cached_trials`` head trials on cached features vs one trial that
    passes the train images through the frozen backbone for ``epochs`` epochs.

    ``tuning_feature_extract_s`` is the one-off cost of computing the cached features.
    """
    import keras

    from cars_ml.layers.preprocess import ImagePreprocess
    from cars_ml.modeling import backbones
    from cars_ml.tuning.config import TuneConfig

    splits = benchmark_splits(records, class_names, root)
    spec = backbones.get_backbone("mobilenet")
    keras.utils.set_random_seed(seed)
    weights_file = Path(workdir) / "mobilenet_benchmark.weights.h5"
    backbones.build_backbone(spec, image_size, "none")[0].save_weights(weights_file)
    cfg = TuneConfig(
        model="mobilenet",
        weights=str(weights_file),
        image_size=image_size,
        max_epochs=epochs,
        fine_tune_epochs=0,
        seed=seed,
    )
    backbone, weights_used = backbones.build_backbone(spec, image_size, str(weights_file))
    start = time.perf_counter()
    features = _features(backbone, ImagePreprocess(spec.preprocess), splits, image_size)
    extract_s = time.perf_counter() - start
    cached = _quiet_objective(cfg, splits, spec, image_size, weights_used, features)
    cached_s = [_timed(cached.train_head, seed + n) for n in range(max(1, cached_trials))]
    full = _quiet_objective(cfg, splits, spec, image_size, weights_used, None)
    uncached_s = _timed(full.train_full, seed)
    keras.backend.clear_session()
    per_trial = float(np.median(cached_s))
    return {
        "tuning_trial_s_cached": per_trial,
        "tuning_trial_s_uncached": uncached_s,
        "tuning_trial_speedup_cached_features": uncached_s / per_trial,
        "tuning_feature_extract_s": extract_s,
    }


def _features(backbone, preprocess, splits, image_size: int) -> dict[str, np.ndarray]:
    """The cached features a head trial trains on, as ``cached_features`` computes them."""
    from cars_ml.tuning.features import extract

    return {
        "train_x": extract(backbone, splits.train, image_size, preprocess),
        "train_y": np.array([r.label for r in splits.train], dtype=np.int32),
        "val_x": extract(backbone, splits.val, image_size, preprocess),
        "val_y": np.array([r.label for r in splits.val], dtype=np.int32),
    }


def _timed(train, seed: int) -> float:
    """Seconds of one trial of ``train`` (an objective's ``train_head`` or ``train_full``)."""
    import keras
    import optuna

    # As Objective.__call__ does before every trial.
    keras.backend.clear_session()
    keras.utils.set_random_seed(seed)
    start = time.perf_counter()
    train(optuna.trial.FixedTrial(TRIAL_PARAMS), dict(TRIAL_PARAMS))
    return time.perf_counter() - start
