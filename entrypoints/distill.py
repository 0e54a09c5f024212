"""MLproject entry point `distill`: train a student backbone on a registered teacher's outputs.

The student is an ordinary train run (same metrics, export, serving model and registration) with
lineage: tags ``distilled_from`` and ``teacher_backbone``, metrics ``teacher_test_f1_macro`` and
``distill_gap``.
"""

from _common import parser, run_main

from cars_ml.params import Entry
from cars_ml.training.config import TrainConfig

ENTRY = Entry(
    "distill",
    TrainConfig,
    "Distil a registered teacher into a student backbone and log it to MLflow.",
    rename={"model": "student"},
)


def build_parser():
    return parser(ENTRY)


def config(a) -> TrainConfig:
    """The student's ``TrainConfig``; a teacher is required."""
    if not a.teacher:
        raise ValueError(
            "teacher is required: pass -P teacher=models:/stanford-cars-classifier/<version> "
            "(a registered version; `mlflow run . --env-manager local` registers several)."
        )
    return ENTRY.build(a)


def main() -> None:
    cfg = config(build_parser().parse_args())  # Before the heavy imports: errors come fast.
    from cars_ml.tuning.storage import with_study_params

    cfg = with_study_params(cfg)  # A bad study or storage fails before TensorFlow loads.
    from cars_ml.training.run import run_train

    run_train(cfg)


if __name__ == "__main__":
    run_main(main)
