"""MLproject entry point `train`: train, evaluate, benchmark, export and register one backbone."""

from _common import add_train_arguments, parser, run_main, train_config


def build_parser():
    p = parser("Train one backbone on Stanford Cars (or synthetic) and log it to MLflow.")
    p.add_argument("--model", default="mobilenet", help="backbone name")
    add_train_arguments(p)
    return p


def config(a):
    """The ``TrainConfig`` of parsed arguments (imports the library)."""
    return train_config(a, a.model)


def main() -> None:
    a = build_parser().parse_args()  # Parse before the heavy imports: errors come fast.
    from cars_ml.training.run import run_train

    run_train(config(a))


if __name__ == "__main__":
    run_main(main)
