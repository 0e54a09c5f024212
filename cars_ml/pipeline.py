"""The ``main`` step: tune -> train (export, benchmark, register) per backbone, then promote.

A parent ``pipeline`` run holds each step as a child run and logs the comparison of all
backbones. A backbone whose inputs (code, parameters, dataset fingerprint) match a finished
earlier run is reused instead of recomputed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import pandas as pd

import cars_ml
from cars_ml import backbones, tracking
from cars_ml.data import DataConfig, load_dataset
from cars_ml.hparams import HParams
from cars_ml.promote import PromotionConfig
from cars_ml.step_pool import Backbone, StepPool

log = logging.getLogger(__name__)

COMPARISON_COLUMNS = (
    "test_f1_macro", "test_accuracy", "latency_ms_p50", "latency_ms_p95", "model_size_mb",
    "tflite_int8_size_mb", "int8_f1_drop", "num_params",
)  # fmt: skip


@dataclass(frozen=True)
class PipelineConfig:
    """The whole comparison; demo budgets apply only to the synthetic data."""

    models: tuple[str, ...] = backbones.ORIGINAL_BACKBONES
    data: DataConfig = field(default_factory=DataConfig)
    n_trials: int = 0  # 0 = auto: DEMO_BUDGET on synthetic data, REAL_BUDGET otherwise
    max_epochs: int = 0
    storage: str = ""
    image_size: int = backbones.AUTO_SIZE
    weights: str = "auto"
    epochs: int = 0
    fine_tune_epochs: int = -1
    promotion: PromotionConfig = field(default_factory=PromotionConfig)
    model_name: str = cars_ml.REGISTERED_MODEL_NAME
    reuse: bool = True
    seed: int = 42
    workers: int = 0  # processes running steps; 0 = auto: 2 on the synthetic demo data, else 1
    trial_fraction: float = 0.0  # training images per trial; 0 = auto (DEMO_TRIAL_FRACTION / 1)

    def __post_init__(self) -> None:
        if not self.models:
            raise ValueError("models is empty; pass e.g. models=mobilenet,resnet.")
        if not 0.0 <= self.trial_fraction <= 1.0:
            raise ValueError(
                f"trial_fraction must be in [0, 1] (0 = auto), got {self.trial_fraction}."
            )
        if self.workers < 0:
            raise ValueError(f"workers must be >= 0 (0 = auto), got {self.workers}.")
        for name in self.models:
            # Every backbone's image size is checked now, not after earlier backbones trained.
            backbones.resolve_image_size(backbones.get_backbone(name), self.image_size)
        backbones.validate_weights(self.weights)


# (n_trials, max_epochs per trial, epochs, fine_tune_epochs): the demo's small budget must
# never leak into real-data runs, so "auto" picks by dataset.
DEMO_BUDGET = (2, 1, 2, 0)
REAL_BUDGET = (20, 5, 8, 4)
# Share of the training split each tuning trial trains on. The demo's trials rank
# hyperparameters on half of it: on a 2-core CPU a trial is mostly compute (Inception-ResNet-v2
# at 75 px: ~20 s of tracing, ~65 s per epoch of 340 images), and the final training still sees
# every image. Real data tunes on all of it unless trial_fraction says otherwise.
DEMO_TRIAL_FRACTION = 0.5
# Images per class the demo takes of the synthetic dataset's 40 (max_per_class=0 = auto). Two
# fits side by side with default hyperparameters took 20-40% less time on 2 cores at a small F1
# cost (Inception 0.96 vs 0.99, MobileNet 0.39 vs 0.42); in a whole demo run ResNet50 and
# Inception fell further (0.79, 0.73; README), the price of the 10-minute goal on slow CPUs.
DEMO_MAX_PER_CLASS = 28


def resolve_data(cfg: PipelineConfig) -> DataConfig:
    """The dataset the steps load: the demo caps the synthetic classes, real data is whole."""
    if cfg.data.data == "synthetic" and cfg.data.max_per_class == 0:
        return replace(cfg.data, max_per_class=DEMO_MAX_PER_CLASS)
    return cfg.data


def resolve_trial_fraction(cfg: PipelineConfig) -> float:
    """The auto (0) trial fraction: ``DEMO_TRIAL_FRACTION`` on synthetic data, else 1."""
    if cfg.trial_fraction:
        return cfg.trial_fraction
    return DEMO_TRIAL_FRACTION if cfg.data.data == "synthetic" else 1.0


def resolve_budget(cfg: PipelineConfig) -> tuple[int, int, HParams]:
    """Resolve the auto (0 / -1) budget knobs: ``(n_trials, max_epochs, hparams)``."""
    base = DEMO_BUDGET if cfg.data.data == "synthetic" else REAL_BUDGET
    n_trials = cfg.n_trials or base[0]
    max_epochs = cfg.max_epochs or base[1]
    epochs = cfg.epochs or base[2]
    fine_tune = base[3] if cfg.fine_tune_epochs < 0 else cfg.fine_tune_epochs
    return n_trials, max_epochs, HParams(epochs=epochs, fine_tune_epochs=fine_tune)


def resolve_workers(cfg: PipelineConfig) -> int:
    """Processes that run the pipeline's steps (``step_pool``).

    Auto means 2 for the synthetic demo on a machine with two or more cores and 1 otherwise: on
    real data each step is long and compute-bound, and workers sharing one GPU would each
    claim its memory.
    """
    import os

    workers = cfg.workers
    if workers == 0:
        workers = 2 if cfg.data.data == "synthetic" and (os.cpu_count() or 1) >= 2 else 1
    return workers


def code_version() -> str:
    """A hash of the library's source, so a code change invalidates reused steps."""
    digest = hashlib.sha256()
    for path in sorted(Path(cars_ml.__file__).parent.rglob("*.py")):
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def step_key(cfg: PipelineConfig, model: str, fingerprint: str) -> str:
    """Key of one backbone's tune+train: code version, its parameters and the dataset."""
    n_trials, max_epochs, hparams = resolve_budget(cfg)
    inputs = {
        "code": code_version(), "model": model, "fingerprint": fingerprint,
        "n_trials": n_trials, "max_epochs": max_epochs, "image_size": cfg.image_size,
        "trial_fraction": cfg.trial_fraction,
        "weights": cfg.weights, "hparams": asdict(hparams), "data": asdict(cfg.data),
        "seed": cfg.seed, "storage": tracking.redact(cfg.storage), "model_name": cfg.model_name,
    }  # fmt: skip
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:24]


def _reusable(cfg: PipelineConfig, key: str):
    """A finished train run with the same step key, when reuse is on."""
    return tracking.find_finished_run({"pipeline_step_key": key}) if cfg.reuse else None


def _steps(cfg: PipelineConfig, model: str, key: str, parent_run_id: str, workers: int) -> Backbone:
    """One backbone's study and final training, both children of the pipeline run.

    With several workers their lines interleave, so trials print one line each (no bar).
    """
    from cars_ml.train_run import TrainConfig
    from cars_ml.tune import TuneConfig

    n_trials, max_epochs, hparams = resolve_budget(cfg)
    study = f"pipeline-{model}-{key[:8]}"
    tune = TuneConfig(
        model=model, data=cfg.data, n_trials=n_trials, storage=cfg.storage,
        image_size=cfg.image_size, weights=cfg.weights, seed=cfg.seed, max_epochs=max_epochs,
        trial_fraction=cfg.trial_fraction, study_name=study, study_total=True,
        parent_run_id=parent_run_id,
        progress_bar=workers == 1)  # fmt: skip
    train = TrainConfig(
        model=model, data=cfg.data, weights=cfg.weights, image_size=cfg.image_size,
        hparams=hparams, seed=cfg.seed, model_name=cfg.model_name, params_from=study,
        storage=cfg.storage, verbose=2, run_tags={"pipeline_step_key": key},
        parent_run_id=parent_run_id)  # fmt: skip
    return Backbone(model, tune, train)


def run_pipeline(cfg: PipelineConfig) -> pd.DataFrame:
    """Run the comparison and promotion; returns the comparison table."""
    from cars_ml.promotion_run import run_promote
    from cars_ml.tune_storage import open_storage

    tracking.check_tracking_server()
    open_storage(cfg.storage or None)  # A bad or unreachable storage fails before any run.
    # The auto (0) knobs resolve once here; every step and the step keys see the same values.
    cfg = replace(cfg, data=resolve_data(cfg), trial_fraction=resolve_trial_fraction(cfg))
    started = time.perf_counter()
    splits = load_dataset(cfg.data)  # Only for the fingerprint here; each step loads its own.
    n_trials, max_epochs, hparams = resolve_budget(cfg)
    workers = resolve_workers(cfg)
    with tracking.start_run(run_name="pipeline", tags={"step": "pipeline"}) as parent:
        tracking.log_params({"models": ",".join(cfg.models), "n_trials": n_trials,
                             "max_epochs": max_epochs, "epochs": hparams.epochs,
                             "trial_fraction": cfg.trial_fraction,
                             "fine_tune_epochs": hparams.fine_tune_epochs, "weights": cfg.weights,
                             "workers": workers, **splits.params()})  # fmt: skip
        results, todo = {}, []
        for model in cfg.models:
            key = step_key(cfg, model, splits.fingerprint)
            previous = _reusable(cfg, key)
            if previous is None:
                todo.append(_steps(cfg, model, key, parent.info.run_id, workers))
                continue
            print(
                f"[pipeline] {model}: reusing run {previous.info.run_id} (same inputs)", flush=True
            )
            results[model] = {"run_id": previous.info.run_id, "reused": True,
                              "model_version": previous.data.tags.get("model_version"),
                              "metrics": previous.data.metrics}  # fmt: skip
        if todo:
            print(f"[pipeline] {len(todo)} backbone(s) to tune ({n_trials} trials x {max_epochs} "
                  f"epochs on {cfg.trial_fraction:.0%} of the training images) and train on {workers} worker "
                  "process(es)", flush=True)  # fmt: skip
            # Largest first: their steps take longest, and one left for last would run alone.
            todo.sort(key=lambda b: backbones.get_backbone(b.model).params, reverse=True)
            with StepPool(workers) as pool:
                results.update({m: {**r, "reused": False} for m, r in pool.run(todo).items()})
        rows = [{"backbone": m, "run_id": results[m]["run_id"],
                 "model_version": results[m]["model_version"], "reused": results[m]["reused"],
                 **{c: results[m]["metrics"].get(c) for c in COMPARISON_COLUMNS}}
                for m in cfg.models]  # fmt: skip
        decision = run_promote(cfg.promotion, cfg.model_name, experiment=None)
        table = pd.DataFrame(rows)
        table["champion"] = table["model_version"].astype(str) == str(decision.new_champion)
        _log_comparison(table)
        wall = time.perf_counter() - started
        tracking.log_metrics({"pipeline_wall_s": wall})
        _print_report(table, decision, wall, parent.info.experiment_id)
    return table


def _log_comparison(table: pd.DataFrame) -> None:
    tracking.log_table(table, "comparison")
    for row in table.itertuples():
        tracking.log_metrics({f"{row.backbone}_{c}": getattr(row, c) for c in ("test_f1_macro", "latency_ms_p50")
                              if getattr(row, c) is not None})  # fmt: skip
    tracking.log_figure(comparison_figure(table), "f1_vs_latency.png")


def comparison_figure(table: pd.DataFrame):
    """Test macro-F1 against batch-1 latency; point size by model size, champion ringed."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5.5))
    data = table.dropna(subset=["test_f1_macro", "latency_ms_p50"])
    sizes = 30 + 8 * data["model_size_mb"].fillna(1).astype(float)
    ax.scatter(data["latency_ms_p50"], data["test_f1_macro"], s=sizes, alpha=0.6)
    for row in data.itertuples():
        ax.annotate(row.backbone, (row.latency_ms_p50, row.test_f1_macro), fontsize=8,
                    xytext=(5, 5), textcoords="offset points")  # fmt: skip
    champ = data[data["champion"]]
    ax.scatter(champ["latency_ms_p50"], champ["test_f1_macro"], s=400, facecolors="none",
               edgecolors="red", linewidths=2, label="champion")  # fmt: skip
    ax.set_xlabel("batch-1 latency p50 (ms)")
    ax.set_ylabel("test macro-F1")
    ax.set_title("Backbones: accuracy against edge latency (point size = model MB)")
    ax.legend(loc="lower right")
    fig.tight_layout()
    return fig


def _print_report(table: pd.DataFrame, decision, wall: float, experiment_id: str) -> None:
    cols = ["backbone", "model_version", *COMPARISON_COLUMNS, "reused", "champion"]
    print("\n" + table[cols].to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    print(f"\n[pipeline] champion: version {decision.new_champion} ({decision.reason})")
    print(f"[pipeline] finished in {wall:.0f} s")
    uri = tracking.tracking_uri()
    print("\nOpen the MLflow UI:\n"
          f"  mlflow ui --backend-store-uri {tracking.redact(uri)}  # then http://127.0.0.1:5000/#/experiments/{experiment_id}\n"
          "Serve the champion:\n"
          f"  MLFLOW_TRACKING_URI={tracking.redact(uri)} mlflow models serve "
          f"-m models:/{cars_ml.REGISTERED_MODEL_NAME}@{cars_ml.CHAMPION_ALIAS} --env-manager local -p 5001",
          flush=True)  # fmt: skip
