"""MLproject entry point `predict`: classify every image in a folder into a CSV (or, on Spark,
a folder or glob into Parquet)."""

from _common import parser, run_main

from cars_ml.params import Entry
from cars_ml.serving.config import PredictConfig

ENTRY = Entry(
    "predict",
    PredictConfig,
    "Run a registered model over a folder of images (recursively) and write a CSV.",
)


def build_parser():
    return parser(ENTRY)


def config(a) -> PredictConfig:
    return ENTRY.build(a)


def main() -> None:
    cfg = config(build_parser().parse_args())
    from cars_ml.serving.predict import run_predict

    run_predict(cfg)


if __name__ == "__main__":
    run_main(main)
