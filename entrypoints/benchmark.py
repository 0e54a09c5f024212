"""MLproject entry point `benchmark`: the product against its baselines, side by side, one run."""

from _common import parser, run_main

from cars_ml.params import Entry
from cars_ml.perf.config import BenchmarkConfig

ENTRY = Entry(
    "benchmark",
    BenchmarkConfig,
    "Benchmark inference, the served endpoint, LiteRT edge models, the input pipeline and "
    "tuning against their baselines; logs one `benchmark` run and prints a markdown table.",
)


def build_parser():
    return parser(ENTRY)


def config(a) -> BenchmarkConfig:
    return ENTRY.build(a)


def main() -> None:
    cfg = config(build_parser().parse_args())
    from cars_ml.perf.run import run_benchmark

    run_benchmark(cfg)


if __name__ == "__main__":
    run_main(main)
