"""MLproject entry point `train`: train, evaluate, benchmark, export and register one backbone."""

from _common import parser, run_main

from cars_ml.params import Entry
from cars_ml.training.config import TrainConfig

ENTRY = Entry(
    "train",
    TrainConfig,
    "Train one backbone on Stanford Cars (or synthetic) and log it to MLflow.",
    exclude=("teacher", "temperature", "alpha"),
)


def build_parser():
    return parser(ENTRY)


def config(a) -> TrainConfig:
    return ENTRY.build(a)


def main() -> None:
    cfg = config(build_parser().parse_args())  # Before the heavy imports: errors come fast.
    from cars_ml.tuning.storage import with_study_params

    cfg = with_study_params(cfg)  # A bad study or storage fails before TensorFlow loads.
    from cars_ml.training.run import run_train

    run_train(cfg)


if __name__ == "__main__":
    run_main(main)
