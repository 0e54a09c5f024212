"""MLproject entry point `serve`: serve a registered model with `mlflow models serve`."""

from _common import parser, run_main

from cars_ml.params import Entry
from cars_ml.serving.config import ServeConfig

ENTRY = Entry(
    "serve",
    ServeConfig,
    "Serve a registered model (default: the champion) over HTTP with MLflow.",
)


def build_parser():
    return parser(ENTRY)


def config(a) -> ServeConfig:
    return ENTRY.build(a)


def main() -> None:
    cfg = config(build_parser().parse_args())
    from cars_ml.serving.run import serve

    serve(cfg)


if __name__ == "__main__":
    run_main(main)
