"""MLproject entry point `distill`: train a student backbone on a registered teacher's outputs.

The student is an ordinary train run (same metrics, export, serving model and registration) with
lineage: tags ``distilled_from`` and ``teacher_backbone``, metrics ``teacher_test_f1_macro`` and
``distill_gap``.
"""

from _common import add_train_arguments, parser, positive_float, run_main, train_config

from cars_ml.training.hparams import DEFAULT_ALPHA, DEFAULT_TEMPERATURE


def build_parser():
    p = parser("Distil a registered teacher into a student backbone and log it to MLflow.")
    p.add_argument(
        "--teacher",
        default="",
        help="the teacher's registered model URI: models:/<name>/<version> or models:/<name>@<alias>",
    )
    p.add_argument("--student", default="mobilenet", help="the student's backbone name")
    p.add_argument(
        "--temperature",
        type=positive_float,
        default=DEFAULT_TEMPERATURE,
        help="softens both models' probabilities in the distillation loss",
    )
    p.add_argument(
        "--alpha",
        type=float,
        default=DEFAULT_ALPHA,
        help="weight of the true-label loss; 1 - alpha goes to the teacher's soft targets",
    )
    add_train_arguments(p)
    return p


def config(a):
    """The student's ``TrainConfig`` of parsed arguments (imports the library)."""
    if not a.teacher:
        raise ValueError(
            "teacher is required: pass -P teacher=models:/stanford-cars-classifier/<version> "
            "(a registered version; `mlflow run . --env-manager local` registers several)."
        )
    return train_config(a, a.student, teacher=a.teacher, temperature=a.temperature, alpha=a.alpha)


def main() -> None:
    a = build_parser().parse_args()  # Parse before the heavy imports: errors come fast.
    cfg = config(a)
    from cars_ml.training.run import run_train

    run_train(cfg)


if __name__ == "__main__":
    run_main(main)
