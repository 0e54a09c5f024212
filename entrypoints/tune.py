"""MLproject entry point `tune`: an Optuna study for one backbone, logged as nested MLflow runs."""

from _common import parser, run_main

from cars_ml.params import Entry
from cars_ml.tuning.config import TuneConfig

ENTRY = Entry(
    "tune",
    TuneConfig,
    "Tune one backbone's hyperparameters with Optuna (one parent run, nested trials).",
)


def build_parser():
    return parser(ENTRY)


def config(a) -> TuneConfig:
    return ENTRY.build(a)


def main() -> None:
    cfg = config(build_parser().parse_args())  # Before the heavy imports: errors come fast.
    from cars_ml.tuning.run import run_tune

    run_tune(cfg)


if __name__ == "__main__":
    run_main(main)
