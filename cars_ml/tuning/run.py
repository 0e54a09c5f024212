"""The ``tune`` step: one Optuna study per invocation, one parent MLflow run, nested trial runs.

Data is loaded once per process; with a pretrained frozen backbone, features are computed
once and cached on disk, and trials train heads on them. Storage is any Optuna RDB URL, so
several processes or machines can share one study (PostgreSQL), and re-running resumes it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import optuna

from cars_ml import tracking
from cars_ml.data import DataConfig, load_dataset, train_subset
from cars_ml.modeling import backbones
from cars_ml.training.teacher import load_teacher
from cars_ml.tuning import search_space
from cars_ml.tuning.sampler import make_sampler
from cars_ml.tuning.storage import (
    best_trial,
    close_dead_trial_runs,
    default_storage,
    deliberate_experimental,
    open_storage,
    storage_errors,
)

log = logging.getLogger(__name__)

PRUNERS = ("median", "hyperband", "none", "threshold:<min val_f1_macro>")
OBJECTIVES = {"f1": "maximize", "latency": "minimize"}


@dataclass(frozen=True)
class TuneConfig:
    """Everything the ``tune`` entry point controls (budget knobs included)."""

    model: str = "mobilenet"
    data: DataConfig = field(default_factory=DataConfig)
    n_trials: int = 10
    timeout_s: float = 0.0
    storage: str = ""
    study_name: str = ""
    pruner: str = "median"
    objectives: str = "f1"
    image_size: int = backbones.AUTO_SIZE
    weights: str = "auto"
    seed: int = 42
    max_epochs: int = 5
    fine_tune_epochs: int = 0
    # Trials train on this stratified fraction of the training split (validation stays whole):
    # a cheaper ranking of hyperparameters; the final training always uses every image.
    trial_fraction: float = 1.0
    cached_features: bool = True
    pins: tuple[tuple[str, object], ...] = ()
    latency_runs: int = 20
    parent_run_id: str = ""  # nest this worker's parent run under another run (the pipeline's)
    # True: n_trials is the study's total over every worker (this one stops when the study has
    # that many); False: this worker runs n_trials more.
    study_total: bool = False
    progress_bar: bool = True  # off where several processes share one terminal
    # A registered teacher's URI makes this a distillation study: every trial trains the student
    # end to end on the teacher's outputs, and temperature and alpha join the search space.
    teacher: str = ""
    # Training compute per image of a trial trained end to end, in GMACs (0 = off): a cheap
    # backbone's trials train for more than max_epochs (hparams.epochs_for_budget), so that they
    # rank hyperparameters for a run as long as its final training.
    budget_gmacs: float = 0.0

    def __post_init__(self) -> None:
        backbones.get_backbone(self.model)
        backbones.validate_weights(self.weights)
        if self.n_trials < 1:
            raise ValueError(f"n_trials must be >= 1, got {self.n_trials}.")
        if self.timeout_s < 0:
            raise ValueError(f"timeout_s must be >= 0 (0 = no limit), got {self.timeout_s}.")
        if self.max_epochs < 1:
            raise ValueError(f"max_epochs must be >= 1, got {self.max_epochs}.")
        if not 0.0 < self.trial_fraction <= 1.0:
            raise ValueError(
                f"trial_fraction must be in (0, 1] (1 = every training image), "
                f"got {self.trial_fraction}."
            )
        make_pruner(self.pruner, self.max_epochs)
        unknown = [o for o in self.objective_names if o not in OBJECTIVES]
        if unknown or not self.objective_names or self.objective_names[0] != "f1":
            raise ValueError(
                f"objectives={self.objectives!r} is not valid; use 'f1' or 'f1,latency'."
            )

    @property
    def objective_names(self) -> list[str]:
        return [o.strip() for o in self.objectives.split(",") if o.strip()]


def make_pruner(spec: str, max_epochs: int) -> optuna.pruners.BasePruner:
    """median, hyperband, none, or threshold:X (prune a trial whose F1 falls below X)."""
    if spec == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=1)
    if spec == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=max_epochs)
    if spec == "none":
        return optuna.pruners.NopPruner()
    if spec.startswith("threshold:"):
        try:
            return optuna.pruners.ThresholdPruner(lower=float(spec.split(":", 1)[1]))
        except ValueError:
            pass
    raise ValueError(f"Unknown pruner {spec!r}; choose one of {', '.join(PRUNERS)}.")


def default_study_name(cfg: TuneConfig, size: int) -> str:
    data = "synthetic" if cfg.data.data == "synthetic" else Path(cfg.data.data).name or "data"
    suffix = "-mo" if len(cfg.objective_names) > 1 else ""
    return f"{cfg.model}-{data}-{size}px{suffix}"


def run_tune(cfg: TuneConfig) -> optuna.Study:
    """Run (or resume) the study; returns it after logging the parent run."""
    tracking.check_tracking_server()
    storage_url = cfg.storage or default_storage()
    storage = open_storage(storage_url)  # Fails fast on a bad or unreachable URL.
    spec = backbones.get_backbone(cfg.model)
    size = backbones.resolve_image_size(
        spec, cfg.image_size, synthetic=cfg.data.data == "synthetic"
    )
    name = cfg.study_name or default_study_name(cfg, size)
    multi = len(cfg.objective_names) > 1
    # Seeded per trial number: parallel workers and resumed studies never repeat a draw.
    sampler = make_sampler(cfg.seed, multi_objective=multi)
    study_args = dict(
        study_name=name,
        storage=storage,
        sampler=sampler,
        pruner=make_pruner(cfg.pruner, cfg.max_epochs),
        directions=[OBJECTIVES[o] for o in cfg.objective_names],
    )
    try:
        study, created = optuna.create_study(**study_args), True
    except optuna.exceptions.DuplicatedStudyError:  # Resuming, or another worker was first.
        study, created = optuna.create_study(**study_args, load_if_exists=True), False
    _close_stale(study)
    n_trials = cfg.n_trials
    if cfg.study_total:
        n_trials -= len(_counted(study))
        if n_trials <= 0:
            print(f"[tune] study {name} already has {cfg.n_trials} trials", flush=True)
            return study
    # A teacher that does not resolve fails before TensorFlow loads or any trial starts.
    teacher_version = tracking.resolve_model_version(cfg.teacher) if cfg.teacher else None
    # TensorFlow loads only once this process has trials to run.
    import keras

    from cars_ml.tuning.objective import Objective, trial_summary

    # Once per process, never inside the objective.
    splits = train_subset(load_dataset(cfg.data), cfg.trial_fraction, cfg.seed)
    # The teacher too, with its validation outputs: every trial reuses them.
    teacher = load_teacher(teacher_version, splits) if teacher_version else None
    # Trials build their own backbones: this one serves cached features (pretrained weights)
    # and latency objectives only, so a random one is not built for nothing.
    backbone, weights_used = backbones.build_backbone(spec, size, cfg.weights, build_random=multi)
    features = None
    tags = {"step": "tune", "backbone": cfg.model, "study_name": name}
    if teacher:
        tags.update(teacher.lineage_tags())
    # A database lost mid-study ends the run FAILED with one clear line, not a traceback.
    with (
        storage_errors(storage_url),
        tracking.start_run(
            run_name=f"tune-{name}", tags=tags, parent_run_id=cfg.parent_run_id or None
        ),
    ):
        use_cache = (
            cfg.cached_features
            and weights_used != "random"
            and cfg.fine_tune_epochs == 0
            and teacher is None  # A student learns from the teacher on every image it sees.
        )
        if use_cache:
            from cars_ml.serving.layers import ImagePreprocess
            from cars_ml.tuning.features import cached_features

            features, hit = cached_features(
                backbone,
                ImagePreprocess(spec.preprocess),
                splits,
                name=cfg.model,
                image_size=size,
                weights_used=weights_used,
            )
            tracking.set_tags({"feature_cache": "hit" if hit else "computed"})
        tracking.log_params(
            {
                "backbone": cfg.model,
                "image_size_px": size,
                "weights_used": weights_used,
                "study_name": name,
                "storage": storage_url,
                "n_trials": cfg.n_trials,
                "timeout_s": cfg.timeout_s,
                "pruner": cfg.pruner,
                "objectives": cfg.objectives,
                "max_epochs": cfg.max_epochs,
                "budget_gmacs": cfg.budget_gmacs,
                "trial_fraction": cfg.trial_fraction,
                "trial_mode": "cached_head" if use_cache else "end_to_end",
                "pins": dict(cfg.pins),
                **splits.params(),
            }
        )
        tracking.log_metrics(splits.summary())  # num_train_images shows the trials' share.
        if teacher:
            from cars_ml.training.evaluate import macro_f1
            from cars_ml.training.fit import labels_of

            val_f1 = macro_f1(labels_of(splits.val), teacher.outputs["val"])
            tracking.log_metrics({"teacher_val_f1_macro": val_f1})
        if created:
            # A new study first tries the defaults. Only the worker whose insert created the
            # study queues them (the database keeps study names unique), never two at once.
            study.enqueue_trial(
                search_space.baseline(dict(cfg.pins), head_only=use_cache, distill=bool(teacher))
            )
        objective = Objective(cfg, splits, spec, size, weights_used, features, teacher)
        objective.backbone_for_latency = backbone
        before = len(study.trials)
        callbacks = [trial_summary]
        if cfg.study_total:
            # Stop as soon as finished and running trials reach the total, so workers that
            # share the study do not overshoot it (one extra trial at most, when they race).
            callbacks.append(optuna.study.MaxTrialsCallback(cfg.n_trials, states=COUNTED))
        study.optimize(
            objective,
            n_trials=n_trials,
            timeout=cfg.timeout_s or None,
            catch=(Exception,),
            callbacks=callbacks,
            show_progress_bar=cfg.progress_bar,
        )
        _log_study(study, before, multi)
    keras.backend.clear_session()
    return study


# Trials that count towards a study's total: all but failed ones (a failed trial is retried).
COUNTED = (
    optuna.trial.TrialState.COMPLETE,
    optuna.trial.TrialState.PRUNED,
    optuna.trial.TrialState.RUNNING,
    optuna.trial.TrialState.WAITING,
)


def _counted(study: optuna.Study) -> list:
    return study.get_trials(deepcopy=False, states=COUNTED)


def _close_stale(study: optuna.Study) -> None:
    """Fail trials whose worker died (no heartbeat) and close their MLflow runs as KILLED."""
    with deliberate_experimental():
        optuna.storages.fail_stale_trials(study)  # RetryAndCloseRuns closes their runs.
    # Trials failed earlier (e.g. by a worker that could not reach MLflow) may still hold one.
    failed = [t for t in study.trials if t.state == optuna.trial.TrialState.FAIL]
    close_dead_trial_runs(failed)


def _log_study(study: optuna.Study, before: int, multi: bool) -> None:
    """Best params/value, trial table and plots on the parent run."""
    frame = study.trials_dataframe()
    states = frame["state"].value_counts().to_dict() if len(frame) else {}
    tracking.log_metrics(
        {
            "trials_total": len(study.trials),
            "trials_this_run": len(study.trials) - before,
            **{f"trials_{k.lower()}": v for k, v in states.items()},
        }
    )
    tracking.log_table(frame.astype(str), "trials")
    try:
        best = best_trial(study)
    except ValueError as exc:
        log.warning("%s", exc)
        tracking.set_tags({"best_trial": "none"})
        return
    tracking.log_params({f"best_{k}": v for k, v in best.params.items()})
    tracking.log_metrics({"best_val_f1_macro": best.values[0]})
    tracking.set_tags(
        {
            "best_trial_run_id": best.user_attrs.get("mlflow_run_id", ""),
            "best_trial_number": str(best.number),
        }
    )
    _log_plots(study, multi)
    print(
        f"[tune] study {study.study_name}: {len(study.trials)} trials, best val_f1_macro="
        f"{best.values[0]:.4f} (trial {best.number}) params={best.params}",
        flush=True,
    )


def _log_plots(study: optuna.Study, multi: bool) -> None:
    import matplotlib

    matplotlib.use("Agg", force=False)
    from optuna.visualization import matplotlib as oplt

    target = (lambda t: t.values[0]) if multi else None
    plots = {
        "optimization_history.png": lambda: oplt.plot_optimization_history(
            study, target=target, target_name="val_f1_macro"
        ),
        "param_importances.png": lambda: oplt.plot_param_importances(
            study, target=target, target_name="val_f1_macro"
        ),
    }
    if multi:
        plots["pareto_front.png"] = lambda: oplt.plot_pareto_front(
            study, target_names=["val_f1_macro", "latency_ms_p50"]
        )
    for name, make in plots.items():
        try:
            with deliberate_experimental():
                axes = make()
            tracking.log_figure(axes.figure, name)
        except Exception as exc:  # Too few trials for a plot is normal in small studies.
            log.warning("Skipped %s: %s", name, exc)
