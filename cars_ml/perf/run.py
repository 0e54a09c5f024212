"""``run_benchmark``: every comparison in one process, logged as one ``benchmark`` MLflow run."""

from __future__ import annotations

import logging
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from cars_ml import tracking
from cars_ml.modeling.backbones import get_backbone
from cars_ml.perf import report
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

SECTIONS = ("inference", "serve", "edge", "pipeline", "tuning", "cpu_kernels")
MODEL_SECTIONS = ("inference", "serve", "edge")
MIN_IMAGE_SIZE = 32  # MobileNet's smallest input


@dataclass(frozen=True)
class BenchmarkConfig:
    """What the ``benchmark`` entry point controls, plus budget knobs for tiny runs."""

    model_uri: str = ""
    image_size: int = 224
    runs: int = 100
    serve_seconds: float = 10.0
    pipeline_images: int = 4000
    sections: tuple[str, ...] = SECTIONS
    warmup: int = 10
    serve_clients: tuple[int, ...] = (1, 8)
    train_image_size: int = 96
    train_steps: int = 0  # 0: whole epochs
    rounds: int = 2
    tuning_epochs: int = 1
    tuning_cached_trials: int = 3
    data_dir: str = ""
    # Backbones whose training step runs with oneDNN off and on (each at its demo image size).
    kernel_models: tuple[str, ...] = ("resnet", "vgg16")
    kernel_steps: int = 6

    def __post_init__(self) -> None:
        unknown = [s for s in self.sections if s not in SECTIONS]
        if unknown or not self.sections:
            raise ValueError(
                f"unknown benchmark section(s) {unknown or self.sections}; choose 'all' or a "
                f"comma list of {', '.join(SECTIONS)}."
            )
        if self.image_size < MIN_IMAGE_SIZE or self.train_image_size < MIN_IMAGE_SIZE:
            raise ValueError(
                f"image_size={self.image_size} and train_image_size={self.train_image_size} must "
                f"be >= {MIN_IMAGE_SIZE} px (MobileNet's minimum)."
            )
        positive = (
            "runs",
            "pipeline_images",
            "rounds",
            "tuning_epochs",
            "tuning_cached_trials",
            "kernel_steps",
        )
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}.")
        if self.train_steps < 0:
            raise ValueError(f"train_steps must be >= 0 (0: whole epochs), got {self.train_steps}.")
        if "cpu_kernels" in self.sections and not self.kernel_models:
            raise ValueError("kernel_models is empty; pass e.g. kernel_models=resnet,vgg16.")
        for name in self.kernel_models:
            get_backbone(name)  # An unknown name fails now, with the list of valid ones.
        if self.serve_seconds <= 0 or self.warmup < 0 or not self.serve_clients:
            raise ValueError("serve_seconds must be > 0, warmup >= 0 and serve_clients non-empty.")


def parse_sections(text: str) -> tuple[str, ...]:
    """``all`` or a comma list such as ``inference,edge`` (order is always SECTIONS order)."""
    names = [s.strip().lower() for s in text.split(",") if s.strip()]
    if not names or names == ["all"]:
        return SECTIONS
    unknown = [n for n in names if n not in SECTIONS]
    if unknown:
        raise ValueError(
            f"unknown benchmark section(s) {unknown}; choose 'all' or a comma list of "
            f"{', '.join(SECTIONS)}."
        )
    return tuple(s for s in SECTIONS if s in names)


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
    uri, model_uri, local = tracking.register_in_scratch_store(
        model,
        class_names,
        cfg.image_size,
        workdir / "scratch_store",
        litert_model=files["float32"],
        litert_int8_model=files["int8"],
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


def _sections(cfg: BenchmarkConfig, workdir: Path):
    """Yield ``(section, metrics)`` in order; inputs are prepared once and shared."""
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
    warmup = min(cfg.warmup, cfg.runs)
    if "inference" in cfg.sections:
        from cars_ml.perf.inference import compare_inference

        yield (
            "inference",
            compare_inference(model.classifier, model.pyfunc, photo, runs=cfg.runs, warmup=warmup),
        )
    if "serve" in cfg.sections:
        from cars_ml.perf.endpoint import compare_serving

        # The float32 and the int8 file side by side, each in its own server.
        served = {}
        for precision in ("float32", "int8"):
            served.update(
                compare_serving(
                    model.model_uri,
                    model.tracking_uri,
                    file_base64(photo),
                    workdir,
                    seconds=cfg.serve_seconds,
                    clients=cfg.serve_clients,
                    precision=precision,
                )
            )
        # The int8 file's gain where a client sees it: the whole request, decode included.
        served["serve_int8_speedup_p50"] = served["serve_p50_ms"] / served["serve_int8_p50_ms"]
        yield "serve", served
    if "edge" in cfg.sections:
        from cars_ml.perf.edge import compare_edge

        rep = representative_images(photo, images.records, size)
        yield (
            "edge",
            compare_edge(
                model.classifier.model,
                photo_pixels(photo, size),
                rep,
                workdir,
                runs=cfg.runs,
                warmup=warmup,
            ),
        )
    if "pipeline" in cfg.sections:
        from cars_ml.perf.input_pipeline import compare_pipeline

        yield (
            "pipeline",
            compare_pipeline(
                images.records,
                image_size=cfg.image_size,
                train_image_size=cfg.train_image_size,
                train_steps=cfg.train_steps,
                rounds=cfg.rounds,
            ),
        )
    if "tuning" in cfg.sections:
        from cars_ml.perf.tuning import compare_tuning

        yield (
            "tuning",
            compare_tuning(
                images.records,
                images.class_names,
                images.root,
                workdir,
                image_size=cfg.image_size,
                epochs=cfg.tuning_epochs,
                cached_trials=cfg.tuning_cached_trials,
            ),
        )
    if "cpu_kernels" in cfg.sections:
        from cars_ml.perf.cpu_kernels import compare_cpu_kernels

        yield (
            "cpu_kernels",
            compare_cpu_kernels(cfg.kernel_models, steps=cfg.kernel_steps, rounds=cfg.rounds),
        )


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
