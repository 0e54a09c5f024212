"""Batch scoring on Spark: the ``predict`` step's ``engine=spark`` job, beyond one machine.

Files are read by Spark's ``binaryFile`` source (a folder recursively, a glob, or any Hadoop
path such as ``s3a://`` or ``hdfs://``) and scored by the same serving pyfunc as the server and
the single-process ``predict``: base64 image in; label, class id, probability and top-k out.

Why ``mapInPandas`` and not ``mlflow.pyfunc.spark_udf``: the pyfunc refuses a whole batch when
one image in it is bad (by design: the server answers 400). Inside ``spark_udf`` that exception
fails the Spark task, then the job, so one truncated JPEG among a million stops the run. Here
each executor's Python worker loads the pyfunc once (``mlflow.pyfunc.load_model``, as
``spark_udf`` does) and scores batches, retrying a refused batch file by file, so a bad file
costs its own row an ``error`` and nothing more. The model directory travels with the job
(``SparkContext.addFile``, as ``spark_udf`` ships it), so executors need no tracking server.

A file over the model's ``max_image_bytes`` is refused from its ``length`` alone: the length
filter is pushed down to the ``binaryFile`` source, which never reads those files' bytes.

The output is Parquet with one row per file: ``path`` (as Spark names it, e.g.
``file:/data/a.jpg``), ``label``, ``class_id``, ``probability``, ``top_k`` (JSON list of
``{label, probability}``) and ``error`` (null when classified).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from urllib.parse import unquote

import pandas as pd

OUTPUT_SCHEMA = (
    "path string, label string, class_id long, probability double, top_k string, error string"
)
# How many failed files the driver brings back to print; the rest are in the Parquet.
SHOWN_ERRORS = 20
_MODELS: dict[str, object] = {}  # one loaded pyfunc per executor Python worker


@dataclass(frozen=True)
class SparkJob:
    """What the Spark job scores, with which model, and where its Parquet goes."""

    images: str
    model_dir: str  # a local folder of the downloaded model (MLmodel, artifacts/)
    output: str
    master: str = "local[*]"
    batch_size: int = 32
    max_image_bytes: int = 10 * 1024 * 1024
    suffixes: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
    overwrite: bool = False  # replace a non-empty ``output`` (Spark deletes it first)


@dataclass(frozen=True)
class SparkSummary:
    num_images: int
    num_errors: int
    first_errors: tuple[tuple[str, str], ...]  # (path, error), at most SHOWN_ERRORS


def suffix_glob(suffixes: tuple[str, ...]) -> str:
    """A Hadoop glob matching any of ``suffixes`` in any case: ``*.{[jJ][pP][gG],...}``."""
    alternatives = [
        "".join(f"[{c.lower()}{c.upper()}]" if c.isalpha() else c for c in s.lstrip("."))
        for s in suffixes
    ]
    return "*.{" + ",".join(alternatives) + "}"


def _is_folder(images: str) -> bool:
    return "://" not in images and os.path.isdir(images)


def _load(model_name: str):
    """The pyfunc shipped with the job, loaded once per Python worker."""
    if model_name not in _MODELS:
        import mlflow.pyfunc
        from pyspark import SparkFiles

        _MODELS[model_name] = mlflow.pyfunc.load_model(SparkFiles.get(model_name))
    return _MODELS[model_name]


def _error_text(exc: Exception) -> str:
    message = getattr(exc, "message", None)
    if isinstance(message, str):
        return message.removeprefix("image 0: ")
    return f"{type(exc).__name__}: {exc}"


def _score(model, values: list[str]) -> list[tuple[dict | None, str | None]]:
    """(prediction, None) or (None, error) per value; a refused batch is retried one by one."""
    try:
        frame = model.predict(pd.DataFrame({"image": values}))
        return [(p, None) for _, p in frame.iterrows()]
    # Whatever refused a batch, file-by-file retries find the file(s) that caused it; anything
    # one file triggers (not an image, a decoder bug) is that file's failure, in its row.
    except Exception as exc:  # noqa: BLE001
        if len(values) > 1:
            return [r for v in values for r in _score(model, [v])]
        return [(None, _error_text(exc))]


def _top_k_json(top_k) -> str:
    return json.dumps(
        [{"label": t["label"], "probability": float(t["probability"])} for t in list(top_k)]
    )


def score_partition(
    batches: Iterator[pd.DataFrame], model_name: str, batch_size: int
) -> Iterator[pd.DataFrame]:
    """``mapInPandas`` body: rows of ``path, image`` (base64) in, OUTPUT_SCHEMA rows out."""
    model = _load(model_name)
    for batch in batches:
        paths, values = list(batch["path"]), list(batch["image"])
        for start in range(0, len(values), batch_size):
            chunk = values[start : start + batch_size]
            rows = []
            for path, (pred, error) in zip(
                paths[start : start + batch_size], _score(model, chunk), strict=True
            ):
                if pred is None:
                    rows.append((path, None, None, None, None, error))
                else:
                    rows.append(
                        (
                            path,
                            str(pred["label"]),
                            int(pred["class_id"]),
                            float(pred["probability"]),
                            _top_k_json(pred["top_k"]),
                            None,
                        )
                    )
            yield pd.DataFrame(
                rows,
                columns=["path", "label", "class_id", "probability", "top_k", "error"],
            ).astype({"class_id": "Int64"})


def build_session(master: str, batch_size: int):
    """A Spark session on ``master``; Arrow batches sized to the model's batches."""
    from pyspark.sql import SparkSession

    return (
        SparkSession.builder.master(master)
        .appName("cars-ml predict")
        .config("spark.sql.execution.arrow.maxRecordsPerBatch", str(batch_size))
        .config("spark.ui.showConsoleProgress", "false")
        .getOrCreate()
    )


def score_files(job: SparkJob, spark=None) -> SparkSummary:
    """Read, score and write ``job``; returns counts and the first errors from the Parquet."""
    from pyspark.sql import functions as F

    own = spark is None
    spark = spark or build_session(job.master, job.batch_size)
    try:
        _check_output(spark, job.output, job.overwrite)
        spark.sparkContext.addFile(job.model_dir, recursive=True)
        model_name = os.path.basename(os.path.normpath(job.model_dir))
        reader = spark.read.format("binaryFile").option("pathGlobFilter", suffix_glob(job.suffixes))
        if _is_folder(job.images):
            reader = reader.option("recursiveFileLookup", "true")
        files = reader.load(job.images)
        limit = job.max_image_bytes
        too_large = files.where(F.col("length") > limit).select(
            "path",
            *(F.lit(None).cast(t).alias(c) for c, t in _VALUE_COLUMNS),
            F.concat(
                F.lit("file is "),
                F.col("length").cast("string"),
                F.lit(
                    f" bytes, over the model's limit of {limit} bytes per image "
                    "(max_image_bytes); it was not read. Shrink or re-encode it."
                ),
            ).alias("error"),
        )
        scored = (
            files.where(F.col("length") <= limit)
            .select("path", F.base64("content").alias("image"))
            .mapInPandas(lambda it: score_partition(it, model_name, job.batch_size), OUTPUT_SCHEMA)
        )
        scored.unionByName(too_large).write.mode("overwrite").parquet(job.output)
        _append_empty_files(spark, files.inputFiles(), job.output)
        written = spark.read.parquet(job.output)
        counts = written.agg(F.count("*").alias("n"), F.count("error").alias("errors")).collect()[0]
        first = written.where(F.col("error").isNotNull()).select("path", "error")
        shown = tuple((r["path"], r["error"]) for r in first.limit(SHOWN_ERRORS).collect())
        return SparkSummary(int(counts["n"]), int(counts["errors"]), shown)
    finally:
        if own:
            spark.stop()


def hadoop_path(uri: str) -> str:
    """A listed file's URI (``file:///a%20b/x.jpg``) as the ``path`` column names it
    (``file:/a b/x.jpg``, Hadoop's ``Path.toString``)."""
    path = unquote(uri)
    return "file:/" + path.removeprefix("file:///") if path.startswith("file:///") else path


def _check_output(spark, output: str, overwrite: bool) -> None:
    """Refuse to write over a file or a non-empty folder (on any Hadoop file system) unless
    ``overwrite``: Spark's overwrite mode deletes everything there first."""
    jvm = spark.sparkContext._jvm
    path = jvm.org.apache.hadoop.fs.Path(output)
    fs = path.getFileSystem(spark.sparkContext._jsc.hadoopConfiguration())
    if overwrite or not fs.exists(path):
        return
    if fs.getFileStatus(path).isDirectory() and len(fs.listStatus(path)) == 0:
        return
    raise ValueError(
        f"output={output!r} already exists and is not empty; Spark would delete everything "
        "in it. Pass another output, or -P overwrite=true to replace it."
    )


def _append_empty_files(spark, listed: list[str], output: str) -> None:
    """Rows with an error for the listed files that left no row: Spark's file scan skips files
    of zero bytes, and a row per file is the promise. Only when the counts differ is the
    (driver-side) listing joined against the written paths."""
    from pyspark.sql import functions as F

    written = spark.read.parquet(output)
    if written.count() >= len(listed):
        return
    names = spark.createDataFrame([(hadoop_path(u),) for u in listed], "path string")
    missing = names.join(written.select("path"), "path", "left_anti").select(
        "path",
        *(F.lit(None).cast(t).alias(c) for c, t in _VALUE_COLUMNS),
        F.lit("file is empty (0 bytes): not an image").alias("error"),
    )
    missing.write.mode("append").parquet(output)


_VALUE_COLUMNS = (
    ("label", "string"),
    ("class_id", "long"),
    ("probability", "double"),
    ("top_k", "string"),
)
