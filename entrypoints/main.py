"""MLproject entry point `main`: the whole comparison (tune, train, export, register, promote)."""

from _common import parser, run_main

from cars_ml.params import Entry
from cars_ml.pipeline.config import PipelineConfig

ENTRY = Entry(
    "main",
    PipelineConfig,
    "Tune, train, export and register each backbone, then promote the edge champion.",
)


def build_parser():
    return parser(ENTRY)


def config(a) -> PipelineConfig:
    return ENTRY.build(a)


def main() -> None:
    cfg = config(build_parser().parse_args())  # Before the heavy imports: errors come fast.
    from cars_ml.pipeline.run import run_pipeline

    run_pipeline(cfg)


if __name__ == "__main__":
    run_main(main)
