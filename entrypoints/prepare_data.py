"""MLproject entry point ``prepare_data``: validate a dataset and log its summary to MLflow."""

from _common import parser, run_main

from cars_ml.data.types import DataConfig
from cars_ml.params import Entry

ENTRY = Entry(
    "prepare_data",
    DataConfig,
    "Validate a dataset (synthetic, Stanford Cars or image folders) and log it.",
)


def build_parser():
    return parser(ENTRY)


def config(a) -> DataConfig:
    return ENTRY.build(a)


def main() -> None:
    cfg = config(build_parser().parse_args())
    from cars_ml.data.run import run_prepare_data

    run_prepare_data(cfg)


if __name__ == "__main__":
    run_main(main)
