"""MLproject entry point `tune`: an Optuna study for one backbone, logged as nested MLflow runs."""

from _common import (
    fraction,
    image_size,
    non_negative_float,
    non_negative_int,
    parser,
    positive_int,
    run_main,
    str2bool,
)


def build_parser():
    p = parser("Tune one backbone's hyperparameters with Optuna (one parent run, nested trials).")
    p.add_argument("--model", default="mobilenet", help="backbone name")
    p.add_argument(
        "--data", default="synthetic", help="synthetic, a Stanford Cars root or image folder"
    )
    p.add_argument("--n_trials", type=positive_int, default=10, help="trials for this worker")
    p.add_argument(
        "--timeout_s", type=float, default=0.0, help="stop after this many seconds (0: none)"
    )
    p.add_argument(
        "--storage", default="", help="Optuna storage URL (empty: SQLite beside mlflow.db)"
    )
    p.add_argument("--study_name", default="", help="empty: <model>-<data>-<size>px")
    p.add_argument("--pruner", default="median", help="median, hyperband, none or threshold:X")
    p.add_argument("--objectives", default="f1", help="f1, or f1,latency for NSGA-II")
    p.add_argument("--image_size", type=image_size, default=-1, help="auto, 0=native or px")
    p.add_argument("--weights", default="auto", help="auto, imagenet, none or a weights file")
    p.add_argument("--seed", type=non_negative_int, default=42)
    p.add_argument("--max_epochs", type=positive_int, default=5, help="epochs per trial")
    p.add_argument(
        "--fine_tune_epochs",
        type=non_negative_int,
        default=0,
        help="fine-tune epochs per trial (>0 trains end to end, no feature cache)",
    )
    p.add_argument(
        "--trial_fraction",
        type=fraction,
        default=1.0,
        help="stratified share of the training images each trial trains on",
    )
    p.add_argument("--max_per_class", type=non_negative_int, default=0, help="sample cap per class")
    p.add_argument("--max_classes", type=non_negative_int, default=0)
    p.add_argument("--cached_features", type=str2bool, default=True)
    p.add_argument("--pin", default="", help="pinned params, e.g. dropout=0.2,head_units=256")
    p.add_argument(
        "--budget_gmacs",
        type=non_negative_float,
        default=0.0,
        help="training compute per image of a trial in GMACs: cheap backbones' trials train "
        "for more than max_epochs (0 = off)",
    )
    p.add_argument(
        "--teacher",
        default="",
        help="a registered teacher (models:/<name>/<version>): a distillation study that also "
        "searches temperature and alpha",
    )
    return p


def config(a):
    """The ``TuneConfig`` of parsed arguments (imports the library)."""
    from cars_ml.data import DataConfig
    from cars_ml.tuning.run import TuneConfig
    from cars_ml.tuning.search_space import parse_pins

    return TuneConfig(
        model=a.model,
        data=DataConfig(
            data=a.data, seed=a.seed, max_per_class=a.max_per_class, max_classes=a.max_classes
        ),
        n_trials=a.n_trials,
        timeout_s=a.timeout_s,
        storage=a.storage,
        study_name=a.study_name,
        pruner=a.pruner,
        objectives=a.objectives,
        image_size=a.image_size,
        weights=a.weights,
        seed=a.seed,
        max_epochs=a.max_epochs,
        fine_tune_epochs=a.fine_tune_epochs,
        trial_fraction=a.trial_fraction,
        cached_features=a.cached_features,
        pins=tuple(parse_pins(a.pin).items()),
        teacher=a.teacher,
        budget_gmacs=a.budget_gmacs,
    )


def main() -> None:
    a = build_parser().parse_args()  # Parse before the heavy imports: errors come fast.
    from cars_ml.tuning.run import run_tune

    run_tune(config(a))


if __name__ == "__main__":
    run_main(main)
