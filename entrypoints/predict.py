"""MLproject entry point `predict`: classify every image in a folder into a CSV (or, on Spark,
a folder or glob into Parquet)."""

from _common import parser, positive_int, run_main, str2bool

from cars_ml import CHAMPION_ALIAS, REGISTERED_MODEL_NAME


def build_parser():
    p = parser("Run a registered model over a folder of images (recursively) and write a CSV.")
    p.add_argument(
        "--images",
        default="",
        help="folder of .jpg/.jpeg/.png/.bmp/.webp (required); with engine=spark also a glob",
    )
    p.add_argument(
        "--model_uri", default=f"models:/{REGISTERED_MODEL_NAME}@{CHAMPION_ALIAS}", help="model"
    )
    p.add_argument(
        "--output",
        default="",
        help="CSV path (default predictions.csv); with engine=spark a Parquet folder "
        "(default predictions.parquet)",
    )
    p.add_argument("--batch_size", type=positive_int, default=32, help="images per model call")
    p.add_argument("--engine", default="local", help="local (this process) or spark")
    p.add_argument("--spark_master", default="local[*]", help="Spark master for engine=spark")
    p.add_argument(
        "--overwrite",
        type=str2bool,
        default=False,
        help="engine=spark: replace a non-empty output (otherwise refused)",
    )
    return p


def config(a):
    """The ``PredictConfig`` of parsed arguments."""
    from cars_ml.serving.predict import PredictConfig

    return PredictConfig(
        images=a.images,
        model_uri=a.model_uri,
        output=a.output,
        batch_size=a.batch_size,
        engine=a.engine,
        spark_master=a.spark_master,
        overwrite=a.overwrite,
    )


def main() -> None:
    a = build_parser().parse_args()
    from cars_ml.serving.predict import run_predict

    run_predict(config(a))


if __name__ == "__main__":
    run_main(main)
