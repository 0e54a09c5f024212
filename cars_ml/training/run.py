"""The ``train`` step: data -> fit -> evaluate -> benchmark -> export -> log -> register.

Everything a user compares in the MLflow UI is logged here under the same names for every
backbone (the metric schema in ``METRIC_SCHEMA``).
"""

from __future__ import annotations

import logging
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from cars_ml import tracking
from cars_ml.data import load_dataset
from cars_ml.data.loader import check_data_path
from cars_ml.data.types import file_sha256
from cars_ml.measure import benchmark
from cars_ml.modeling import backbones, distribute
from cars_ml.schema import METRIC_SCHEMA
from cars_ml.training import evaluate, slices
from cars_ml.training.config import TrainConfig
from cars_ml.training.hparams import (
    epochs_for_budget,
)
from cars_ml.training.teacher import load_teacher

log = logging.getLogger(__name__)

HEADLINE_TAGS = ("test_f1_macro", "test_accuracy", "latency_ms_p95", "model_size_mb")


@dataclass
class TrainOutcome:
    run_id: str
    metrics: dict[str, float]
    model_uri: str
    model_version: str | None


@dataclass
class _Setup:
    """A train step's resolved inputs, before its MLflow run starts."""

    cfg: TrainConfig  # with the compute budget's epochs applied
    strat: object  # the tf.distribute strategy
    spec: backbones.BackboneSpec
    size: int
    backbone: object
    weights_used: str
    forward_gmacs: float
    splits: object
    teacher: object | None  # cars_ml.training.teacher.TeacherInfo


class _Laps:
    """Wall time of each named phase, as ``time_<phase>_s`` metrics."""

    def __init__(self) -> None:
        self.timings: dict[str, float] = {}
        self._clock = time.perf_counter()

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.timings[f"time_{name}_s"] = now - self._clock
        self._clock = now


def run_train(cfg: TrainConfig) -> TrainOutcome:
    """Run the whole train step inside one MLflow run and return its outcome.

    ``params_from`` is recorded, not read: its study's best params are applied before the step
    (``cars_ml.tuning.storage.with_study_params``), since tuning sits above training.
    """
    tracking.check_tracking_server()
    check_data_path(cfg.data)
    # A teacher URI that does not resolve fails before TensorFlow starts or any data is read.
    teacher_version = tracking.resolve_model_version(cfg.teacher) if cfg.teacher else None
    setup = _resolve(cfg, teacher_version)
    cfg, teacher = setup.cfg, setup.teacher
    tags = {
        "backbone": cfg.model,
        "step": "distill" if teacher else "train",
        "params_from": cfg.params_from or "-",
        **cfg.run_tags,
        **(teacher.lineage_tags() if teacher else {}),
    }
    with tracking.start_run(
        run_name=cfg.run_name or f"train-{cfg.model}",
        tags=tags,
        parent_run_id=cfg.parent_run_id or None,
    ) as run:
        datasets = _log_inputs(setup)
        laps = _Laps()
        result = _fit(setup)
        laps.lap("fit")
        metrics = _evaluate_and_log(cfg, setup.splits, result, setup.size, teacher)
        laps.lap("evaluate")
        info, files = _measure_and_log_model(setup, result, metrics, datasets, laps)
        tracking.log_metrics(laps.timings)
        version = _register(setup, run.info.run_id, info.model_uri, metrics, files)
        _print_summary(cfg, metrics, version)
        return TrainOutcome(run.info.run_id, metrics, info.model_uri, version)


def _resolve(cfg: TrainConfig, teacher_version) -> _Setup:
    """Devices, backbone (built first: weights=imagenet fails before any data is read), the
    compute budget's epochs, the data and the teacher's answers."""
    # TensorFlow loads here, not at import: configuring a step does not need it.
    import keras

    from cars_ml.measure.macs import count_macs

    # Choose the devices before anything starts TensorFlow's runtime (a CPU split needs that).
    strat = distribute.strategy(cfg.devices)
    spec = backbones.get_backbone(cfg.model)
    size = backbones.resolve_image_size(
        spec, cfg.image_size, synthetic=cfg.data.data == "synthetic"
    )
    keras.utils.set_random_seed(cfg.seed)
    # Variables created in the strategy's scope are mirrored on every replica.
    with strat.scope():
        backbone, weights_used = backbones.build_backbone(spec, size, cfg.weights)
    forward_gmacs = count_macs(backbone) / 1e9
    if cfg.budget_gmacs:
        epochs = epochs_for_budget(cfg.budget_gmacs, forward_gmacs, cfg.hparams.epochs)
        cfg = replace(cfg, hparams=replace(cfg.hparams, epochs=epochs))
    splits = load_dataset(cfg.data)
    teacher = load_teacher(teacher_version, splits) if teacher_version else None
    return _Setup(cfg, strat, spec, size, backbone, weights_used, forward_gmacs, splits, teacher)


def _log_inputs(setup: _Setup) -> dict[str, object]:
    """The run's params, the data's summary and its datasets (returned, to link metrics to)."""
    cfg, splits = setup.cfg, setup.splits
    tracking.log_params(
        {
            "backbone": cfg.model,
            "image_size": "auto" if cfg.image_size == backbones.AUTO_SIZE else cfg.image_size,
            "image_size_px": setup.size,
            "weights": cfg.weights,
            "weights_used": setup.weights_used,
            "seed": cfg.seed,
            "params_from": cfg.params_from or "-",
            **splits.params(),
            **{f"data_{k}": v for k, v in vars(cfg.data).items() if k not in ("data",)},
            **cfg.hparams.as_params(),
            **distribute.describe(setup.strat),
            "budget_gmacs": cfg.budget_gmacs,
            **({"temperature": cfg.temperature, "alpha": cfg.alpha} if setup.teacher else {}),
        }
    )
    tracking.log_metrics({**splits.summary(), "forward_gmacs": setup.forward_gmacs})
    return _log_datasets(splits)


def _log_epoch(epoch: int, row: dict[str, float]) -> None:
    tracking.log_metrics({k: v for k, v in row.items() if k not in ("epoch", "phase")}, step=epoch)


def _fit(setup: _Setup):
    """The two-phase fit (on the teacher's answers for a student), each epoch logged."""
    from cars_ml.training.distill import Teacher
    from cars_ml.training.fit import fit

    cfg, teacher = setup.cfg, setup.teacher
    with setup.strat.scope():  # The head, the optimizer and compile() must be mirrored too.
        result = fit(
            setup.splits,
            setup.spec,
            setup.size,
            setup.backbone,
            setup.weights_used,
            cfg.hparams,
            seed=cfg.seed,
            epoch_hook=_log_epoch,
            verbose=cfg.verbose,
            teacher=(
                Teacher(teacher.outputs["train"], cfg.temperature, cfg.alpha) if teacher else None
            ),
        )
    tracking.log_params(
        {
            "training_mode": result.training_mode,
            "tf_grappler": "on" if result.grappler else "off",
            "train_image_size_px": result.train_size,
        }
    )
    return result


def _measure_and_log_model(setup: _Setup, result, metrics: dict, datasets: dict, laps: _Laps):
    """Size and latency, the TFLite files (exported and measured), then the served model, all
    added to ``metrics``; returns the logged model's info and the TFLite paths by kind."""
    from cars_ml.serving.package import serving_model
    from cars_ml.training.fit import inference_fn

    cfg, size = setup.cfg, setup.size
    with tempfile.TemporaryDirectory() as tmp:
        saved = Path(tmp) / "model.keras"
        result.model.save(saved)  # Saved once: measured here, logged below.
        metrics["model_size_mb"] = benchmark.file_size_mb(saved)
        metrics["num_params"] = float(result.model.count_params())
        infer = inference_fn(result.model)
        metrics.update(benchmark.benchmark_inference(infer, size, runs=cfg.benchmark_runs))
        laps.lap("benchmark")
        files: dict[str, Path] = {}
        if cfg.export_tflite:
            edge, files = _export(
                cfg, setup.splits, result.model, size, metrics["test_f1_macro"], Path(tmp)
            )
            metrics.update(edge)
            laps.lap("export")
        # The served model carries the float32 flatbuffer just exported and the probabilities
        # TensorFlow gives on its probe images, so neither this logging (MLflow loads the model
        # to check the input example) nor a server start converts the model again or even
        # loads it into Keras.
        with serving_model(
            result.model,
            list(setup.splits.class_names),
            size,
            litert_model=files.get("float32"),
            litert_int8_model=files.get("int8"),
            saved_model=saved,
            reference=infer,
        ) as served:
            info = tracking.log_pyfunc_model(served)
        # Once, linked to the logged model and the split each was measured on (MLflow 3's
        # model view lists them); the run shows them as ever.
        _log_model_metrics(metrics, info.model_id, datasets, len(result.history))
    laps.lap("log_model")
    return info, {kind: Path(path).name for kind, path in files.items()}


def _register(
    setup: _Setup, run_id: str, model_uri: str, metrics: dict, files: dict[str, str]
) -> str | None:
    """Register the logged model (when ``register``) with its headline metrics, lineage and the
    URIs of its TFLite files; returns the new version."""
    cfg = setup.cfg
    if not cfg.register:
        return None
    tags = {k: f"{metrics[k]:.4f}" for k in HEADLINE_TAGS if k in metrics}
    if setup.teacher:
        tags.update(setup.teacher.lineage_tags())
    # The TFLite files, findable from the version (they are artifacts of its run).
    tags.update({f"tflite_{kind}_uri": f"runs:/{run_id}/tflite/{n}" for kind, n in files.items()})
    mv = tracking.register_model(
        model_uri, cfg.model_name, {"backbone": cfg.model, **tags}, metrics
    )
    version = str(mv.version)
    tracking.set_tags({"registered_model": cfg.model_name, "model_version": version})
    return version


def _evaluate_and_log(cfg: TrainConfig, splits, result, size: int, teacher) -> dict[str, float]:
    """Validation and test metrics, their figures and tables, the fine-grained slices, and a
    student's gap to its teacher."""
    from cars_ml.data.pipeline import make_dataset
    from cars_ml.training.fit import labels_of, predict_probabilities

    batch = cfg.hparams.batch_size
    names = list(splits.class_names)
    val_probs = predict_probabilities(
        result.model, make_dataset(splits.val, size, batch, training=False)
    )
    test_probs = predict_probabilities(
        result.model, make_dataset(splits.test, size, batch, training=False)
    )
    test_labels = labels_of(splits.test)
    metrics = {"val_f1_macro": evaluate.macro_f1(labels_of(splits.val), val_probs)}
    metrics.update(evaluate.classification_metrics(test_labels, test_probs, "test"))
    preds = test_probs.argmax(axis=1)
    tracking.log_figure(
        evaluate.confusion_matrix_figure(test_labels, preds, names), "confusion_matrix.png"
    )
    tracking.log_figure(evaluate.training_curves_figure(result.history), "training_curves.png")
    report = evaluate.per_class_report(test_labels, preds, names)
    tracking.log_table(report, "per_class_report")
    metrics.update(_log_fine_grained(cfg, splits, test_labels, preds, report))
    if teacher:
        metrics["teacher_test_f1_macro"] = evaluate.macro_f1(test_labels, teacher.outputs["test"])
        metrics["distill_gap"] = metrics["teacher_test_f1_macro"] - metrics["test_f1_macro"]
    return metrics


def _log_fine_grained(cfg: TrainConfig, splits, labels, preds, report) -> dict[str, float]:
    """Slice metrics, the most confused pairs and per-class F1 beside the training count.

    Artifacts under ``evaluation/``: ``slices`` (worst first), ``confused_pairs`` (+ ``.png``),
    ``per_class_train_counts``; tag ``worst_slices``. Returns the metrics (logged with the rest).
    """
    from cars_ml.training.fit import labels_of

    names = list(splits.class_names)
    train_counts = np.bincount(labels_of(splits.train), minlength=len(names))
    tracking.log_table(
        slices.per_class_with_train_counts(report, train_counts),
        "per_class_train_counts",
        "evaluation",
    )
    pairs = slices.confused_pairs(labels, preds, names)
    tracking.log_table(pairs, "confused_pairs", "evaluation")
    if len(pairs):
        tracking.log_figure(slices.confused_pairs_figure(pairs), "evaluation/confused_pairs.png")
    groups = slices.class_groups(names, cfg.slices or None)
    if not groups:
        log.info("No slices: the class names carry no make or body type and no slices file.")
        return {}
    metrics, table = slices.slice_metrics(labels, preds, groups)
    tracking.log_table(table, "slices", "evaluation")
    tracking.set_tags({"worst_slices": slices.worst_slices(table) or "-"})
    return metrics


def _split_frame(splits, records):
    """The split's images as rows (path relative to the data root, label, class name)."""
    import os

    import pandas as pd

    return pd.DataFrame(
        {
            "path": [os.path.relpath(r.path, splits.root) for r in records],
            "label": [r.label for r in records],
            "class_name": [splits.class_names[r.label] for r in records],
        }
    )


DATASET_CONTEXTS = (("train", "training"), ("val", "validation"), ("test", "test"))


def _log_datasets(splits) -> dict[str, object]:
    """The three splits as MLflow dataset inputs; returns them by split name."""
    return {
        split: tracking.log_dataset(
            _split_frame(splits, getattr(splits, split)),
            name=f"{splits.name}-{split}",
            source=splits.root,
            fingerprint=splits.fingerprint,
            context=context,
        )
        for split, context in DATASET_CONTEXTS
    }


def _log_model_metrics(metrics: dict[str, float], model_id: str, datasets: dict, step: int) -> None:
    """Log ``metrics`` linked to the model: ``test_*`` and ``slice_*`` to the test split,
    ``val_*`` to the validation split, the rest (size, latency) to no dataset.

    ``step`` follows the last epoch's, so that the run's ``val_f1_macro`` (MLflow shows the
    value of the highest step) is the final model's, not its last epoch's: the pipeline ranks
    reused runs by it."""
    by_split: dict[str, dict[str, float]] = {"test": {}, "val": {}, "": {}}
    for key, value in metrics.items():
        split = (
            "test"
            if key.startswith(("test_", "slice_"))
            else "val"
            if key.startswith("val_")
            else ""
        )
        by_split[split][key] = value
    for split, part in by_split.items():
        tracking.log_metrics(part, step, model_id=model_id, dataset=datasets.get(split))


def _export(
    cfg: TrainConfig, splits, model, size: int, float_f1: float, out_dir: Path
) -> tuple[dict, dict[str, Path]]:
    """Export, measure and log the TFLite files into ``out_dir``; returns (metrics, paths)."""
    from cars_ml.data.pipeline import load_images_array
    from cars_ml.export.tflite import MAX_REPRESENTATIVE, edge_metrics
    from cars_ml.training.fit import inference_fn, labels_of

    rng = np.random.default_rng(cfg.seed)
    pool = list(splits.train)
    picks = rng.choice(len(pool), size=min(MAX_REPRESENTATIVE, len(pool)), replace=False)
    rep = load_images_array([pool[i] for i in picks], size)
    test_images = load_images_array(list(splits.test), size)
    infer = inference_fn(model)
    keras_preds = np.concatenate(
        [
            infer(test_images[i : i + 64].astype(np.float32)).numpy().argmax(axis=1)
            for i in range(0, len(test_images), 64)
        ]
    )
    metrics, paths = edge_metrics(
        model,
        rep,
        test_images,
        labels_of(splits.test),
        float_f1,
        out_dir,
        keras_test_preds=keras_preds,
        infer=infer,
    )
    for path in paths.values():
        tracking.log_artifact(path, "tflite")
    # The edge agent loads a file only if its bytes hash to what this run recorded.
    tracking.set_tags({f"tflite_{kind}_sha256": file_sha256(p) for kind, p in paths.items()})
    return {**metrics, **_device_estimates(metrics)}, paths


def _device_estimates(edge: dict[str, float]) -> dict[str, float]:
    """This host's probe peaks and, for every calibrated device, the estimated latency of both
    files there (``measure/estimate.py``); the peaks let promotion estimate for devices
    calibrated later."""
    from cars_ml.measure.estimate import estimate_latencies, profile_peaks
    from cars_ml.measure.peaks import host_peak_gmacs

    peaks = host_peak_gmacs()
    profiles = {name: profile_peaks(m) for name, m in tracking.device_profiles().items()}
    return {**peaks, **estimate_latencies({**edge, **peaks}, profiles)}


def _print_summary(cfg: TrainConfig, metrics: dict[str, float], version: str | None) -> None:
    extra = (
        "tflite_int8_size_mb",
        "int8_f1_drop",
        "int8_agreement",
        "teacher_test_f1_macro",
        "distill_gap",
    )
    keys = [k for k in (*METRIC_SCHEMA, *extra) if k in metrics]
    lines = [f"  {k:<24} {metrics[k]:.4f}" for k in keys]
    where = f"registered as {cfg.model_name} v{version}" if version else "not registered"
    taught = f", distilled from {cfg.teacher}" if cfg.teacher else ""
    print(f"\n[train] {cfg.model}{taught}: {where}\n" + "\n".join(lines), flush=True)
