"""MLproject entry point `benchmark`: the product against its baselines, side by side, one run."""

from _common import comma_list, parser, positive_float, positive_int, run_main


def build_parser():
    p = parser(
        "Benchmark inference, the served endpoint, LiteRT edge models, the input pipeline and "
        "tuning against their baselines; logs one `benchmark` run and prints a markdown table."
    )
    p.add_argument(
        "--model_uri",
        default="",
        help="model to measure (models:/name@alias); empty: a MobileNet built here",
    )
    p.add_argument(
        "--image_size", type=positive_int, default=224, help="pixels (built model, data)"
    )
    p.add_argument("--runs", type=positive_int, default=100, help="timed calls per latency median")
    p.add_argument(
        "--rounds",
        type=positive_int,
        default=2,
        help="turns each side of the pipeline and CPU-kernel comparisons takes (best kept)",
    )
    p.add_argument(
        "--serve_seconds",
        type=positive_float,
        default=10.0,
        help="seconds of load per client count against the served endpoint",
    )
    p.add_argument(
        "--pipeline_images",
        type=positive_int,
        default=4000,
        help="images for the input pipeline and tuning comparisons",
    )
    p.add_argument(
        "--sections",
        default="all",
        help="all, or a comma list of inference,serve,edge,pipeline,tuning,cpu_kernels",
    )
    p.add_argument(
        "--kernel_models",
        default="resnet,vgg16",
        help="backbones whose training step runs with oneDNN off and on (cpu_kernels)",
    )
    return p


def config(a):
    """The ``BenchmarkConfig`` of parsed arguments (imports the library)."""
    from cars_ml.perf.run import BenchmarkConfig, parse_sections

    return BenchmarkConfig(
        model_uri=a.model_uri,
        image_size=a.image_size,
        runs=a.runs,
        rounds=a.rounds,
        serve_seconds=a.serve_seconds,
        pipeline_images=a.pipeline_images,
        sections=parse_sections(a.sections),
        kernel_models=comma_list(a.kernel_models),
    )


def main() -> None:
    a = build_parser().parse_args()
    from cars_ml.perf.run import run_benchmark

    run_benchmark(config(a))


if __name__ == "__main__":
    run_main(main)
