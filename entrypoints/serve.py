"""MLproject entry point `serve`: serve a registered model with `mlflow models serve`."""

from _common import parser, positive_int, run_main, str2bool

from cars_ml import CHAMPION_ALIAS, REGISTERED_MODEL_NAME


def build_parser():
    p = parser("Serve a registered model (default: the champion) over HTTP with MLflow.")
    p.add_argument("--model_name", default=REGISTERED_MODEL_NAME, help="registered model name")
    p.add_argument("--alias", default=CHAMPION_ALIAS, help="registry alias to serve")
    p.add_argument("--model_uri", default="", help="overrides name and alias when set")
    p.add_argument("--port", type=positive_int, default=5001)
    p.add_argument("--host", default="127.0.0.1", help="0.0.0.0 listens on every interface")
    p.add_argument("--workers", type=positive_int, default=1, help="uvicorn worker processes")
    p.add_argument(
        "--precision",
        default="float32",
        choices=("float32", "int8"),
        help="which exported TFLite file the server runs; int8 is what the edge device runs",
    )
    p.add_argument(
        "--allow_old_serving_code",
        type=str2bool,
        default=False,
        help="serve a version registered with serving code older than this release's minimum",
    )
    return p


def config(a):
    """The ``ServeConfig`` of parsed arguments."""
    from cars_ml.serving.run import ServeConfig

    return ServeConfig(
        model_name=a.model_name,
        alias=a.alias,
        model_uri=a.model_uri,
        port=a.port,
        host=a.host,
        workers=a.workers,
        precision=a.precision,
        allow_old_serving_code=a.allow_old_serving_code,
    )


def main() -> None:
    a = build_parser().parse_args()
    from cars_ml.serving.run import serve

    serve(config(a))


if __name__ == "__main__":
    run_main(main)
