"""One tuning trial: sample, train (a head on cached features, or end to end), score.

Data and cached features are loaded once per process and handed in; a trial only builds and
trains models. Each trial opens its own nested MLflow run (created here, not by a callback).
"""

from __future__ import annotations

import logging
import time

import keras
import numpy as np
import optuna
import tensorflow as tf

from cars_ml import tracking
from cars_ml.measure import benchmark
from cars_ml.measure.macs import count_macs
from cars_ml.modeling import backbones
from cars_ml.modeling.optimizers import FusedAdam
from cars_ml.training.distill import Teacher
from cars_ml.training.evaluate import macro_f1
from cars_ml.training.fit import HParams, class_weights, compile_for_training, fit, inference_fn
from cars_ml.training.hparams import epochs_for_budget
from cars_ml.tuning import search_space

log = logging.getLogger(__name__)


class Objective:
    """Callable objective for ``study.optimize``; returns F1 (and latency in multi-objective)."""

    def __init__(
        self, cfg, splits, spec, size: int, weights_used: str, features=None, teacher=None
    ):
        self.cfg = cfg
        self.splits = splits
        self.spec = spec
        self.size = size
        self.weights_used = weights_used
        self.features = features
        self.teacher = teacher  # training.teacher.TeacherInfo of a distillation study, loaded once
        self.multi = "latency" in cfg.objective_names

    def __call__(self, trial: optuna.Trial):
        keras.backend.clear_session()
        keras.utils.set_random_seed(self.cfg.seed + trial.number)
        head_only = self.features is not None
        params = search_space.sample(
            trial, dict(self.cfg.pins), head_only=head_only, distill=self.teacher is not None
        )
        trial.set_user_attr("pinned", dict(self.cfg.pins))
        tags = {
            "optuna_trial": str(trial.number),
            "study_name": trial.study.study_name,
            "backbone": self.cfg.model,
            "step": "tune_trial",
        }
        pruned = False
        start = time.perf_counter()
        with tracking.start_run(run_name=f"trial-{trial.number}", nested=True, tags=tags) as run:
            trial.set_user_attr("mlflow_run_id", run.info.run_id)
            tracking.log_params(
                {**params, "trial_mode": "cached_head" if head_only else "end_to_end"}
            )
            try:
                f1, model = (
                    self.train_head(trial, params) if head_only else self.train_full(trial, params)
                )
                values = [f1]
                metrics = {"final_val_f1_macro": f1}
                if self.multi:
                    lat = benchmark.benchmark_inference(
                        inference_fn(model), self.size, runs=self.cfg.latency_runs
                    )
                    values.append(lat["latency_ms_p50"])
                    metrics["latency_ms_p50"] = lat["latency_ms_p50"]
                metrics["trial_seconds"] = time.perf_counter() - start
                tracking.log_metrics(metrics)
                tracking.set_tags({"optuna_state": "COMPLETE"})
            except optuna.TrialPruned:
                pruned = True
                tracking.set_tags({"optuna_state": "PRUNED"})
            except Exception:
                tracking.set_tags({"optuna_state": "FAIL"})
                raise
        if pruned:
            raise optuna.TrialPruned()
        return values if self.multi else values[0]

    def epoch_hook(self, trial: optuna.Trial):
        def on_epoch(epoch: int, row: dict) -> None:
            tracking.log_metrics({"val_f1_macro": row["val_f1_macro"]}, step=epoch)
            if not self.multi:  # Optuna cannot prune multi-objective studies.
                trial.report(row["val_f1_macro"], epoch)
                if trial.should_prune():
                    raise optuna.TrialPruned(f"pruned at epoch {epoch}")

        return on_epoch

    def train_head(self, trial: optuna.Trial, params: dict):
        """Train only a head on cached backbone features."""
        f = self.features
        n = self.splits.num_classes
        head = backbones.build_head(
            f["train_x"].shape[1],
            n,
            params["dropout"],
            params["head_units"],
            params["weight_decay"],
        )
        compile_for_training(
            head,
            FusedAdam(params["learning_rate"]),
            loss=keras.losses.CategoricalCrossentropy(label_smoothing=params["label_smoothing"]),
        )
        train = (
            tf.data.Dataset.from_tensor_slices((f["train_x"], tf.one_hot(f["train_y"], n)))
            .shuffle(len(f["train_y"]), seed=self.cfg.seed)
            .batch(params.get("batch_size", HParams().batch_size))
            .prefetch(tf.data.AUTOTUNE)
        )
        hook = self.epoch_hook(trial)
        scores: list[float] = []

        class Score(keras.callbacks.Callback):
            def on_epoch_end(self, epoch, logs=None):
                probs = head(f["val_x"], training=False).numpy()
                scores.append(macro_f1(f["val_y"], probs))
                hook(epoch, {"val_f1_macro": scores[-1]})

        head.fit(
            train,
            epochs=self.cfg.max_epochs,
            verbose=0,
            callbacks=[Score()],
            class_weight=class_weights(f["train_y"], n),
            shuffle=False,
        )
        model = None
        if self.multi:
            model = backbones.build_classifier(
                self.spec, self.size, self.backbone_for_latency, head
            )
        return float(max(scores)), model

    def train_full(self, trial: optuna.Trial, params: dict):
        """Train backbone and head end to end (random weights, or fine-tuning trials)."""
        # The study already resolved the weights; do not retry a failed download per trial.
        weights = "none" if self.weights_used == "random" else self.cfg.weights
        backbone, _ = backbones.build_backbone(self.spec, self.size, weights)
        known = {k: v for k, v in params.items() if k in HParams.__dataclass_fields__}
        epochs = epochs_for_budget(
            self.cfg.budget_gmacs, count_macs(backbone) / 1e9, self.cfg.max_epochs
        )
        tracking.log_params({"trial_epochs": epochs})
        # A trial is scored on its float validation macro-F1, so it skips the
        # quantization-aware epochs that prepare a final model for its int8 file.
        hp = HParams(
            epochs=epochs,
            fine_tune_epochs=self.cfg.fine_tune_epochs,
            qat_epochs=0,
            patience=epochs,
            **known,
        )
        teacher = None
        if self.teacher is not None:
            teacher = Teacher(self.teacher.outputs["train"], params["temperature"], params["alpha"])
        result = fit(
            self.splits,
            self.spec,
            self.size,
            backbone,
            self.weights_used,
            hp,
            seed=self.cfg.seed,
            epoch_hook=self.epoch_hook(trial),
            verbose=0,
            recalibrate=False,
            teacher=teacher,
        )
        return float(result.best_val_f1_macro), result.model

    backbone_for_latency: keras.Model | None = None


def trial_summary(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
    """Print one line per finished trial (the progress bar shows the rest)."""
    took = (
        (trial.datetime_complete - trial.datetime_start).total_seconds()
        if trial.datetime_complete
        else np.nan
    )
    value = "-" if trial.values is None else ", ".join(f"{v:.4f}" for v in trial.values)
    print(
        f"[tune] trial {trial.number} {trial.state.name} value={value} ({took:.1f}s) "
        f"params={trial.params}",
        flush=True,
    )
