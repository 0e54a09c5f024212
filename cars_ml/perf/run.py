"""``run_benchmark``: every comparison in one process, logged as one ``benchmark`` MLflow run."""

from __future__ import annotations

import logging
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from cars_ml import tracking
from cars_ml.perf import report
from cars_ml.perf.config import (  # noqa: F401  (re-exported)
    MODEL_SECTIONS,
    SECTIONS,
    BenchmarkConfig,
    parse_sections,
)
from cars_ml.perf.inputs import (
    car_class_names,
    file_base64,
    image_set,
    photo_pixels,
    representative_images,
    sample_photo,
    shared_data_dir,
)

log = logging.getLogger(__name__)


@dataclass
class _Model:
    """The classifier under test: in-process pyfunc, its CarsClassifier, where it is served."""

    pyfunc: object
    classifier: object
    model_uri: str
    tracking_uri: str
    source: str


def _built_model(cfg: BenchmarkConfig, class_names: list[str], workdir: Path) -> _Model:
    """A MobileNet with random weights and a 196-class head, registered in a scratch store."""
    import keras

    from cars_ml.export.tflite import export_tflite
    from cars_ml.modeling import backbones
    from cars_ml.serving.package import serving_model

    keras.utils.set_random_seed(0)
    spec = backbones.get_backbone("mobilenet")
    backbone, _ = backbones.build_backbone(spec, cfg.image_size, "none")
    head = backbones.build_head(backbone.output_shape[-1], len(class_names), 0.3, 0)
    model = backbones.build_classifier(spec, cfg.image_size, backbone, head)
    # Both TFLite files, as the train step ships them, so the serve section can run each;
    # random pixels calibrate the int8 ranges, which is enough to time it.
    rng = np.random.default_rng(0)
    calibration = rng.integers(0, 256, (8, cfg.image_size, cfg.image_size, 3), dtype=np.uint8)
    files = export_tflite(model, workdir / "tflite", calibration)
    with serving_model(
        model,
        class_names,
        cfg.image_size,
        litert_model=files["float32"],
        litert_int8_model=files["int8"],
    ) as served:
        uri, model_uri, local = tracking.register_in_scratch_store(
            served, workdir / "scratch_store"
        )
    pyfunc = tracking.load_pyfunc(local)
    return _Model(pyfunc, pyfunc.unwrap_python_model(), model_uri, uri, "mobilenet_random_weights")


def _model_under_test(cfg: BenchmarkConfig, class_names: list[str], workdir: Path) -> _Model:
    if not cfg.model_uri:
        return _built_model(cfg, class_names, workdir)
    tracking.check_model_uri(cfg.model_uri)
    pyfunc = tracking.load_pyfunc(cfg.model_uri)
    classifier = pyfunc.unwrap_python_model()
    if not hasattr(classifier, "predict_images"):
        raise ValueError(
            f"{cfg.model_uri} is not a cars-ml serving model (no CarsClassifier inside); pass a "
            "model logged by the train step."
        )
    return _Model(pyfunc, classifier, cfg.model_uri, tracking.tracking_uri(), cfg.model_uri)


@dataclass
class _Inputs:
    """What the sections measure on, prepared once and shared."""

    photo: Path
    images: object  # cars_ml.perf.inputs.ImageSet
    model: _Model | None
    size: int  # the model's input size, else the configured one
    warmup: int
    workdir: Path


def _inputs(cfg: BenchmarkConfig, workdir: Path) -> _Inputs:
    data_dir = shared_data_dir(cfg.data_dir)
    photo, photo_source = sample_photo(data_dir, workdir)
    images = image_set(data_dir, cfg.pipeline_images)
    tracking.log_params(
        {
            "photo": str(photo),
            "photo_source": photo_source,
            "images_source": images.source,
            "images_used": len(images.records),
        }
    )
    model = None
    if any(s in cfg.sections for s in MODEL_SECTIONS):
        model = _model_under_test(cfg, car_class_names(data_dir), workdir)
        tracking.log_params(
            {
                "model_under_test": model.source,
                "model_image_size_px": model.classifier.image_size,
                "serving_engine": model.classifier.engine,
            }
        )
    size = model.classifier.image_size if model else cfg.image_size
    return _Inputs(photo, images, model, size, min(cfg.warmup, cfg.runs), workdir)


def _sections(cfg: BenchmarkConfig, workdir: Path):
    """Yield ``(section, metrics)`` in order; inputs are prepared once and shared."""
    inputs = _inputs(cfg, workdir)
    for section in (s for s in SECTIONS if s in cfg.sections):
        yield section, _SECTIONS[section](cfg, inputs)


def _inference(cfg: BenchmarkConfig, inputs: _Inputs) -> dict[str, float]:
    from cars_ml.perf.inference import compare_inference

    model = inputs.model
    return compare_inference(
        model.classifier, model.pyfunc, inputs.photo, runs=cfg.runs, warmup=inputs.warmup
    )


def _serve(cfg: BenchmarkConfig, inputs: _Inputs) -> dict[str, float]:
    """The float32 and the int8 file side by side, each in its own server."""
    from cars_ml.perf.endpoint import compare_serving

    served = {}
    for precision in ("float32", "int8"):
        served.update(
            compare_serving(
                inputs.model.model_uri,
                inputs.model.tracking_uri,
                file_base64(inputs.photo),
                inputs.workdir,
                seconds=cfg.serve_seconds,
                clients=cfg.serve_clients,
                precision=precision,
            )
        )
    # The int8 file's gain where a client sees it: the whole request, decode included.
    served["serve_int8_speedup_p50"] = served["serve_p50_ms"] / served["serve_int8_p50_ms"]
    return served


def _edge(cfg: BenchmarkConfig, inputs: _Inputs) -> dict[str, float]:
    from cars_ml.perf.edge import compare_edge

    return compare_edge(
        inputs.model.classifier.model,
        photo_pixels(inputs.photo, inputs.size),
        representative_images(inputs.photo, inputs.images.records, inputs.size),
        inputs.workdir,
        runs=cfg.runs,
        warmup=inputs.warmup,
    )


def _pipeline(cfg: BenchmarkConfig, inputs: _Inputs) -> dict[str, float]:
    from cars_ml.perf.input_pipeline import compare_pipeline

    return compare_pipeline(
        inputs.images.records,
        image_size=cfg.image_size,
        train_image_size=cfg.train_image_size,
        train_steps=cfg.train_steps,
        rounds=cfg.rounds,
    )


def _tuning(cfg: BenchmarkConfig, inputs: _Inputs) -> dict[str, float]:
    from cars_ml.perf.tuning import compare_tuning

    images = inputs.images
    return compare_tuning(
        images.records,
        images.class_names,
        images.root,
        inputs.workdir,
        image_size=cfg.image_size,
        epochs=cfg.tuning_epochs,
        cached_trials=cfg.tuning_cached_trials,
    )


def _cpu_kernels(cfg: BenchmarkConfig, inputs: _Inputs) -> dict[str, float]:
    from cars_ml.perf.cpu_kernels import compare_cpu_kernels

    return compare_cpu_kernels(cfg.kernel_models, steps=cfg.kernel_steps, rounds=cfg.rounds)


_SECTIONS = {
    "inference": _inference,
    "serve": _serve,
    "edge": _edge,
    "pipeline": _pipeline,
    "tuning": _tuning,
    "cpu_kernels": _cpu_kernels,
}


def run_benchmark(cfg: BenchmarkConfig) -> dict[str, float]:
    """Run the chosen comparisons; log params, every metric and ``benchmark.md`` to one run.

    Prints the markdown table (each metric, its goal and pass/miss) and returns the metrics.
    """
    tracking.check_tracking_server()
    info = report.machine()
    metrics: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="cars-ml-benchmark-") as tmp:
        workdir = Path(tmp)
        with tracking.start_run(run_name="benchmark", tags={"step": "benchmark"}):
            config = {
                k: (",".join(map(str, v)) if isinstance(v, tuple) else v)
                for k, v in asdict(cfg).items()
            }
            tracking.log_params({**config, **info})
            began = time.perf_counter()
            for section, result in _sections(cfg, workdir):
                tracking.log_metrics(result)
                metrics.update(result)
                summary = ", ".join(f"{k}={v:.4g}" for k, v in result.items())
                took, began = time.perf_counter() - began, time.perf_counter()
                print(f"[benchmark] {section} ({took:.0f} s): {summary}", flush=True)
            table = report.markdown_table(metrics, info)
            path = workdir / "benchmark.md"
            path.write_text(table, encoding="utf-8")
            tracking.log_artifact(path)
            met = report.goal_summary(metrics)
            tracking.set_tags({"goals_met": sum(met.values()), "goals_measured": len(met)})
    print(table, flush=True)
    return metrics
