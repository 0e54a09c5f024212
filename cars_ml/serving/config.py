"""The ``serve`` and ``predict`` steps' configuration: each field is also their parameter.

No MLflow, no image decoding: an entry point builds its parser from these at once.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cars_ml import CHAMPION_ALIAS, REGISTERED_MODEL_NAME
from cars_ml.params import param, positive_int

PRECISIONS = ("float32", "int8")  # the TFLite file a server runs
ENGINES = ("local", "spark")


@dataclass(frozen=True)
class ServeConfig:
    """Which registered model to serve and where; ``model_uri`` overrides name and alias."""

    model_name: str = param(REGISTERED_MODEL_NAME, "registered model name")
    alias: str = param(CHAMPION_ALIAS, "registry alias to serve")
    model_uri: str = param("", "overrides name and alias when set")
    port: int = param(5001, parse=positive_int)
    host: str = param("127.0.0.1", "0.0.0.0 listens on every interface")
    workers: int = param(1, "uvicorn worker processes", parse=positive_int)
    precision: str = param(
        "float32",
        "which exported TFLite file the server runs; int8 is what the edge device runs",
        choices=PRECISIONS,
    )
    allow_old_serving_code: bool = param(
        False, "serve a version registered with serving code older than this release's minimum"
    )

    def __post_init__(self) -> None:
        if self.precision not in ("float32", "int8"):
            raise ValueError(f"precision={self.precision!r} must be float32 or int8.")
        if not 0 < self.port < 65536:
            raise ValueError(f"port={self.port} must be between 1 and 65535.")
        if self.workers < 1:
            raise ValueError(f"workers={self.workers} must be >= 1.")
        if not self.model_uri and not (self.model_name and self.alias):
            raise ValueError("pass model_uri, or both model_name and alias.")
        try:
            ipaddress.ip_address(self.host)
        except ValueError:
            if self.host != "localhost":
                raise ValueError(
                    f"host={self.host!r} is not an IP address; use 127.0.0.1 (this machine only) "
                    "or 0.0.0.0 (every interface; put authentication in front of it)."
                ) from None

    @property
    def uri(self) -> str:
        return self.model_uri or f"models:/{self.model_name}@{self.alias}"


@dataclass(frozen=True)
class PredictConfig:
    """Which folder, which model, where the CSV goes."""

    images: str = param(
        "", "folder of .jpg/.jpeg/.png/.bmp/.webp (required); with engine=spark also a glob"
    )
    model_uri: str = param(f"models:/{REGISTERED_MODEL_NAME}@{CHAMPION_ALIAS}", "model")
    output: str = param(
        "",
        "CSV path (default predictions.csv); with engine=spark a Parquet folder "
        "(default predictions.parquet)",
    )
    batch_size: int = param(32, "images per model call", parse=positive_int)
    # local: this process reads the folder; spark: Spark's binaryFile source reads a folder, a
    # glob or any Hadoop path, and executors score it (cars_ml.serving.spark_predict).
    engine: str = param("local", "local (this process) or spark")
    spark_master: str = param("local[*]", "Spark master for engine=spark")
    overwrite: bool = param(False, "engine=spark: replace a non-empty output (otherwise refused)")

    def __post_init__(self) -> None:
        if not self.images:
            raise ValueError("images is required: pass -P images=<folder of images>.")
        if self.engine not in ENGINES:
            raise ValueError(f"engine={self.engine!r} must be one of {', '.join(ENGINES)}.")
        if self.engine == "spark":
            if not self.spark_master:
                raise ValueError("spark_master is required with engine=spark (e.g. local[*]).")
        elif not Path(self.images).is_dir():
            raise ValueError(f"images={self.images!r} is not a folder; pass a folder of images.")
        from cars_ml.serving.decode import Limits

        if not 1 <= self.batch_size <= Limits().max_images_per_request:
            raise ValueError(
                f"batch_size={self.batch_size} must be between 1 and the serving limit of "
                f"{Limits().max_images_per_request} images per request."
            )

    @property
    def output_path(self) -> str:
        """Where the predictions go: ``output``, or the engine's default name."""
        return self.output or (
            "predictions.parquet" if self.engine == "spark" else "predictions.csv"
        )
