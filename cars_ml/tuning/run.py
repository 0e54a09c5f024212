"""The ``tune`` step: one Optuna study per invocation, one parent MLflow run, nested trial runs.

Data is loaded once per process; with a pretrained frozen backbone, features are computed
once and cached on disk, and trials train heads on them. Storage is any Optuna RDB URL, so
several processes or machines can share one study (PostgreSQL), and re-running resumes it.
"""

from __future__ import annotations

import logging
from pathlib import Path

import optuna

from cars_ml import tracking
from cars_ml.data import load_dataset, train_subset
from cars_ml.modeling import backbones
from cars_ml.training.teacher import load_teacher
from cars_ml.tuning import search_space
from cars_ml.tuning.config import OBJECTIVES, TuneConfig, make_pruner
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


def default_study_name(cfg: TuneConfig, size: int) -> str:
    data = "synthetic" if cfg.data.data == "synthetic" else Path(cfg.data.data).name or "data"
    suffix = "-mo" if len(cfg.objective_names) > 1 else ""
    return f"{cfg.model}-{data}-{size}px{suffix}"


def run_tune(cfg: TuneConfig) -> optuna.Study:
    """Run (or resume) the study; returns it after logging the parent run."""
    tracking.check_tracking_server()
    storage_url = cfg.storage or default_storage()
    spec = backbones.get_backbone(cfg.model)
    size = backbones.resolve_image_size(
        spec, cfg.image_size, synthetic=cfg.data.data == "synthetic"
    )
    study, created = _open_study(cfg, storage_url, size)
    n_trials = _trials_to_run(cfg, study)
    if n_trials <= 0:
        print(f"[tune] study {study.study_name} already has {cfg.n_trials} trials", flush=True)
        return study
    # A teacher that does not resolve fails before TensorFlow loads or any trial starts.
    teacher_version = tracking.resolve_model_version(cfg.teacher) if cfg.teacher else None
    # TensorFlow loads only once this process has trials to run.
    import keras

    splits, teacher, backbone, weights_used = _load_once(cfg, spec, size, teacher_version)
    tags = {"step": "tune", "backbone": cfg.model, "study_name": study.study_name}
    if teacher:
        tags.update(teacher.lineage_tags())
    # A database lost mid-study ends the run FAILED with one clear line, not a traceback.
    with (
        storage_errors(storage_url),
        tracking.start_run(
            run_name=f"tune-{study.study_name}", tags=tags, parent_run_id=cfg.parent_run_id or None
        ),
    ):
        use_cache = (
            cfg.cached_features
            and weights_used != "random"
            and cfg.fine_tune_epochs == 0
            and teacher is None  # A student learns from the teacher on every image it sees.
        )
        features = _features(cfg, spec, size, backbone, weights_used, splits) if use_cache else None
        _log_inputs(cfg, study.study_name, storage_url, size, weights_used, use_cache, splits)
        if teacher:
            tracking.log_metrics({"teacher_val_f1_macro": _teacher_val_f1(splits, teacher)})
        if created:
            # A new study first tries the defaults. Only the worker whose insert created the
            # study queues them (the database keeps study names unique), never two at once.
            study.enqueue_trial(
                search_space.baseline(dict(cfg.pins), head_only=use_cache, distill=bool(teacher))
            )
        from cars_ml.tuning.objective import Objective

        objective = Objective(cfg, splits, spec, size, weights_used, features, teacher)
        objective.backbone_for_latency = backbone
        _optimize(cfg, study, objective, n_trials)
    keras.backend.clear_session()
    return study


def _open_study(cfg: TuneConfig, storage_url: str, size: int) -> tuple[optuna.Study, bool]:
    """The study (created, or loaded to resume or to join other workers) with its stale trials
    closed; whether this call created it."""
    storage = open_storage(storage_url)  # Fails fast on a bad or unreachable URL.
    multi = len(cfg.objective_names) > 1
    study_args = dict(
        study_name=cfg.study_name or default_study_name(cfg, size),
        storage=storage,
        # Seeded per trial number: parallel workers and resumed studies never repeat a draw.
        sampler=make_sampler(cfg.seed, multi_objective=multi),
        pruner=make_pruner(cfg.pruner, cfg.max_epochs),
        directions=[OBJECTIVES[o] for o in cfg.objective_names],
    )
    try:
        study, created = optuna.create_study(**study_args), True
    except optuna.exceptions.DuplicatedStudyError:  # Resuming, or another worker was first.
        study, created = optuna.create_study(**study_args, load_if_exists=True), False
    _close_stale(study)
    return study, created


def _load_once(cfg: TuneConfig, spec, size: int, teacher_version):
    """What every trial shares, loaded once per process and never inside the objective: the
    data, the teacher's answers and the backbone (its features or its latency)."""
    splits = train_subset(load_dataset(cfg.data), cfg.trial_fraction, cfg.seed)
    teacher = load_teacher(teacher_version, splits) if teacher_version else None
    # Trials build their own backbones: this one serves cached features (pretrained weights)
    # and latency objectives only, so a random one is not built for nothing.
    multi = len(cfg.objective_names) > 1
    backbone, weights_used = backbones.build_backbone(spec, size, cfg.weights, build_random=multi)
    return splits, teacher, backbone, weights_used


def _teacher_val_f1(splits, teacher) -> float:
    from cars_ml.training.evaluate import macro_f1
    from cars_ml.training.fit import labels_of

    return macro_f1(labels_of(splits.val), teacher.outputs["val"])


def _trials_to_run(cfg: TuneConfig, study: optuna.Study) -> int:
    """``n_trials`` more, or (``study_total``) what the study lacks of ``n_trials``."""
    if cfg.study_total:
        return cfg.n_trials - len(_counted(study))
    return cfg.n_trials


def _features(cfg: TuneConfig, spec, size: int, backbone, weights_used: str, splits) -> dict:
    """The frozen backbone's features of every training and validation image, cached on disk."""
    from cars_ml.layers.preprocess import ImagePreprocess
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
    return features


def _log_inputs(
    cfg: TuneConfig, name: str, storage_url: str, size: int, weights_used: str, use_cache, splits
) -> None:
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


def _optimize(cfg: TuneConfig, study: optuna.Study, objective, n_trials: int) -> None:
    """Run ``n_trials`` trials, then log the study's results on the parent run."""
    from cars_ml.tuning.objective import trial_summary

    before = len(study.trials)
    callbacks = [trial_summary]
    if cfg.study_total:
        # Stop as soon as finished and running trials reach the total, so workers that share
        # the study do not overshoot it (one extra trial at most, when they race).
        callbacks.append(optuna.study.MaxTrialsCallback(cfg.n_trials, states=COUNTED))
    study.optimize(
        objective,
        n_trials=n_trials,
        timeout=cfg.timeout_s or None,
        catch=(Exception,),
        callbacks=callbacks,
        show_progress_bar=cfg.progress_bar,
    )
    _log_study(study, before, len(cfg.objective_names) > 1)


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
