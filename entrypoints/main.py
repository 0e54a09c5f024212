"""MLproject entry point `main`: the whole comparison (tune, train, export, register, promote)."""

import argparse

from _common import (
    budget,
    comma_list,
    fraction,
    image_size,
    integer,
    non_negative_int,
    parser,
    positive_float,
    run_main,
    str2bool,
)

from cars_ml import PRESET_CHOICES
from cars_ml.promotion.policy import Budgets
from cars_ml.training.hparams import DEFAULT_ALPHA, DEFAULT_TEMPERATURE

_BUDGETS = Budgets()


def budget_gmacs(value: str) -> float:
    """``auto`` (-1), 0 (off) or GMACs of training compute per image."""
    if value.strip().lower() == "auto":
        return -1.0
    number = float(value)
    if not number >= 0:
        raise argparse.ArgumentTypeError(f"must be auto, 0 (off) or a number > 0, got {value!r}")
    return number


def build_parser():
    p = parser("Tune, train, export and register each backbone, then promote the edge champion.")
    p.add_argument(
        "--models",
        default="",
        help="comma-separated backbones; empty = the preset's (the seven original ones on "
        "synthetic data, EfficientNet-Lite2 and -Lite0 with preset cpu)",
    )
    p.add_argument(
        "--data", default="synthetic", help="synthetic, a Stanford Cars root or image folder"
    )
    p.add_argument(
        "--preset",
        default="auto",
        choices=PRESET_CHOICES,
        help="the auto knobs: demo (synthetic data), cpu (real data within 90 minutes on 2 "
        "cores), full (real data on a GPU); auto = demo on synthetic data, else full with a "
        "GPU and cpu without",
    )
    auto = "0 = auto: a small demo budget on synthetic data, a full one on real data"
    p.add_argument(
        "--n_trials", type=non_negative_int, default=0, help=f"trials per backbone; {auto}"
    )
    p.add_argument(
        "--max_epochs", type=non_negative_int, default=0, help=f"epochs per trial; {auto}"
    )
    p.add_argument("--epochs", type=non_negative_int, default=0, help=f"final head epochs; {auto}")
    p.add_argument("--fine_tune_epochs", type=integer, default=-1, help="-1 = auto")
    p.add_argument(
        "--trial_fraction",
        type=fraction,
        default=0.0,
        help="share of the training images each trial trains on; 0 = auto "
        "(half on synthetic data, all on real data)",
    )
    p.add_argument(
        "--storage", default="", help="Optuna storage URL (empty: SQLite beside mlflow.db)"
    )
    p.add_argument("--image_size", type=image_size, default=-1, help="auto, 0=native or px")
    p.add_argument("--weights", default="auto", help="auto, imagenet, none or a weights file")
    p.add_argument(
        "--max_per_class",
        type=non_negative_int,
        default=0,
        help="sample cap per class; 0 = auto (28 on synthetic data, none on real data)",
    )
    p.add_argument("--max_latency_ms", type=budget, default=_BUDGETS.max_latency_ms)
    p.add_argument("--max_size_mb", type=budget, default=_BUDGETS.max_size_mb)
    p.add_argument("--max_int8_f1_drop", type=budget, default=_BUDGETS.max_int8_f1_drop)
    p.add_argument("--reuse", type=str2bool, default=True, help="reuse steps with the same inputs")
    p.add_argument("--seed", type=non_negative_int, default=42)
    p.add_argument(
        "--budget_gmacs",
        type=budget_gmacs,
        default=-1.0,
        help="training compute per image in GMACs for every final training (epochs by "
        "cost); auto: 2.5 on synthetic data, off (0) on real data",
    )
    p.add_argument(
        "--distill",
        type=str2bool,
        default=True,
        help="distil the run's best model into the backbones within the edge budgets",
    )
    p.add_argument(
        "--distill_students",
        default="",
        help="comma-separated students instead of those within the budgets",
    )
    p.add_argument("--temperature", type=positive_float, default=DEFAULT_TEMPERATURE)
    p.add_argument(
        "--alpha",
        type=fraction,
        default=DEFAULT_ALPHA,
        help="weight of the true labels in the students' loss",
    )
    p.add_argument(
        "--workers",
        type=non_negative_int,
        default=0,
        help="processes that tune and train backbones side by side; "
        "0 = auto (2 on synthetic data, else 1)",
    )
    return p


def config(a: argparse.Namespace):
    """The ``PipelineConfig`` of parsed arguments (imports the library)."""
    from cars_ml.data import DataConfig
    from cars_ml.pipeline.plan import PipelineConfig
    from cars_ml.promotion.policy import PromotionConfig

    return PipelineConfig(
        models=comma_list(a.models),
        data=DataConfig(data=a.data, seed=a.seed, max_per_class=a.max_per_class),
        preset=a.preset,
        n_trials=a.n_trials,
        max_epochs=a.max_epochs,
        storage=a.storage,
        image_size=a.image_size,
        weights=a.weights,
        epochs=a.epochs,
        fine_tune_epochs=a.fine_tune_epochs,
        promotion=PromotionConfig(
            budgets=Budgets(
                max_latency_ms=a.max_latency_ms,
                max_size_mb=a.max_size_mb,
                max_int8_f1_drop=a.max_int8_f1_drop,
            )
        ),
        reuse=a.reuse,
        seed=a.seed,
        workers=a.workers,
        trial_fraction=a.trial_fraction,
        budget_gmacs=a.budget_gmacs,
        distill=a.distill,
        distill_students=comma_list(a.distill_students),
        temperature=a.temperature,
        alpha=a.alpha,
    )


def main() -> None:
    a = build_parser().parse_args()  # Parse before the heavy imports: errors come fast.
    from cars_ml.pipeline.run import run_pipeline

    run_pipeline(config(a))


if __name__ == "__main__":
    run_main(main)
