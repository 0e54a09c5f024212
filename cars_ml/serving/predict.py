"""The ``predict`` step: run a registered model over every image in a folder, write a CSV.

The model is loaded once and fed batches of base64 images, exactly what the server receives.
When a batch is refused (one file is not a readable image), its files are retried one by one,
so a bad file costs one row with an ``error`` and never stops the run. A file over the model's
per-image byte limit is refused from its size alone, before it is read. File names are user
controlled and labels come from the model, so CSV cells that a spreadsheet would run as a
formula are neutralised (see :func:`spreadsheet_safe`).
"""

from __future__ import annotations

import base64
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
from tqdm import tqdm

from cars_ml import tracking
from cars_ml.serving.config import ENGINES, PredictConfig  # noqa: F401  (re-exported)
from cars_ml.serving.decode import Limits

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
CSV_COLUMNS = ("file", "label", "class_id", "probability", "top5", "error")
# A cell starting with one of these is run as a formula by Excel, LibreOffice and Google Sheets
# (OWASP "CSV injection"); tab and carriage return are included because some of them strip
# those first and then read the rest as a formula.
_FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def spreadsheet_safe(value):
    """``value`` with a leading single quote when it is text a spreadsheet would run."""
    if isinstance(value, str) and value.startswith(_FORMULA_STARTS):
        return "'" + value
    return value


@dataclass(frozen=True)
class PredictResult:
    output: Path
    num_images: int
    errors: tuple[str, ...]  # relative paths of unreadable files


def find_images(folder: str | Path) -> list[Path]:
    """Image files under ``folder``, recursively, by suffix (any case), in a stable order."""
    root = Path(folder)
    return sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def _format_top5(top_k) -> str:
    return "; ".join(
        f"{item['label']}:{float(item['probability']):.4f}" for item in list(top_k)[:5]
    )


def _row(name: str, prediction=None, error: str = "") -> dict:
    if prediction is None:
        return {
            "file": name,
            "label": "",
            "class_id": None,
            "probability": None,
            "top5": "",
            "error": error,
        }
    return {
        "file": name,
        "label": prediction["label"],
        "class_id": int(prediction["class_id"]),
        "probability": float(prediction["probability"]),
        "top5": _format_top5(prediction["top_k"]),
        "error": "",
    }


def _predict_one(model, name: str, value: str, errors: dict[str, str]) -> dict:
    try:
        return _row(name, model.predict(pd.DataFrame({"image": [value]})).iloc[0])
    except tracking.MlflowException as exc:
        errors[name] = exc.message.removeprefix("image 0: ")
    # Anything else one file triggers (a decoder bug, a malformed answer) is that file's
    # failure: it is recorded in its row and the other files are still classified.
    except Exception as exc:  # noqa: BLE001
        errors[name] = f"{type(exc).__name__}: {exc}"
    return _row(name, error=errors[name])


def _predict_batch(model, names: list[str], values: list, errors: dict[str, str]) -> list[dict]:
    """Rows for one batch; if the model refuses it, retry file by file so only bad files fail."""
    rows = [
        _row(n, error=errors[n]) if v is None else None for n, v in zip(names, values, strict=True)
    ]
    good = [i for i, v in enumerate(values) if v is not None]
    if not good:
        return rows
    try:
        frame = model.predict(pd.DataFrame({"image": [values[i] for i in good]}))
    # Whatever refused the batch, file-by-file retries find the file(s) that caused it.
    except Exception:  # noqa: BLE001
        for i in good:
            rows[i] = _predict_one(model, names[i], values[i], errors)
        return rows
    for i, (_, prediction) in zip(good, frame.iterrows(), strict=True):
        rows[i] = _row(names[i], prediction)
    return rows


def _max_image_bytes(model) -> int:
    """The loaded model's per-image byte limit (``serving_config.json``), or the default."""
    try:
        limits = model.unwrap_python_model().limits
    # A model that is not our serving pyfunc has no limits of its own.
    except (AttributeError, tracking.MlflowException):
        limits = Limits()
    return int(limits.max_image_bytes)


def _max_image_bytes_of(model_dir: Path) -> int:
    """A downloaded model's per-image byte limit, read from its ``serving_config.json``.

    Reading the file, not loading the model, spares the Spark driver the model's load (it
    imports TensorFlow: tens of seconds); the executors load it.
    """
    path = Path(model_dir) / "artifacts" / "serving_config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return int(Limits().max_image_bytes)
    return int(Limits(**config.get("limits", {})).max_image_bytes)


def _read_image(path: Path, max_bytes: int) -> str:
    """``path`` as base64, refusing a file over ``max_bytes`` before reading it.

    The size is checked with ``stat`` first, and the read itself stops one byte past the limit,
    so a file that grows in between is refused too instead of being read whole.
    """
    size = path.stat().st_size
    if size > max_bytes:
        raise _TooLarge(size, max_bytes)
    with path.open("rb") as handle:
        data = handle.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise _TooLarge(len(data), max_bytes)
    return base64.b64encode(data).decode("ascii")


class _TooLarge(Exception):
    def __init__(self, size: int, limit: int):
        super().__init__(
            f"file is {size} bytes, over the model's limit of {limit} bytes per image "
            "(max_image_bytes); it was not read. Shrink or re-encode it."
        )


def run_predict(cfg: PredictConfig) -> PredictResult:
    """Predict every image under ``cfg.images``; write and log the CSV; name unreadable files.

    With ``engine="spark"`` Spark reads and scores the files instead (:func:`_run_spark`).
    """
    tracking.check_tracking_server()
    if cfg.engine == "spark":
        return _run_spark(cfg)
    files = find_images(cfg.images)
    if not files:
        raise ValueError(
            f"no images under {cfg.images!r} (looked for {', '.join(IMAGE_SUFFIXES)}, any case)."
        )
    tracking.check_model_uri(cfg.model_uri)
    root = Path(cfg.images)
    output = Path(cfg.output_path)
    output.parent.mkdir(parents=True, exist_ok=True)
    with tracking.start_run("predict", tags={"step": "predict"}):
        tracking.log_params(
            {
                "model_uri": cfg.model_uri,
                "images": str(root.resolve()),
                "batch_size": cfg.batch_size,
            }
        )
        model = tracking.load_pyfunc(cfg.model_uri)
        max_bytes = _max_image_bytes(model)
        rows: list[dict] = []
        errors: dict[str, str] = {}
        with tqdm(total=len(files), unit="img", desc="predict") as bar:
            for start in range(0, len(files), cfg.batch_size):
                batch = files[start : start + cfg.batch_size]
                names = [p.relative_to(root).as_posix() for p in batch]
                values = []
                for name, path in zip(names, batch, strict=True):
                    try:
                        values.append(_read_image(path, max_bytes))
                    except _TooLarge as exc:
                        errors[name] = str(exc)
                        values.append(None)
                    except OSError as exc:
                        errors[name] = f"cannot read file: {exc.strerror or exc}"
                        values.append(None)
                rows.extend(_predict_batch(model, names, values, errors))
                bar.update(len(batch))
        table = pd.DataFrame(rows, columns=list(CSV_COLUMNS))
        for column in ("file", "label", "top5", "error"):
            table[column] = table[column].map(spreadsheet_safe)
        # Nullable integers keep class ids as 7, not 7.0, next to the empty cells of bad files.
        # RFC 4180 line ends make the writer quote a name holding a carriage return, which would
        # otherwise split its row in two.
        table.astype({"class_id": "Int64"}).to_csv(output, index=False, lineterminator="\r\n")
        tracking.log_metrics({"num_images": len(files), "num_errors": len(errors)})
        tracking.log_artifact(output)
    if errors:
        print(f"\n[predict] {len(errors)} file(s) could not be classified:")
        for name, message in errors.items():
            print(f"  {name}: {message}")
    print(f"[predict] {len(files) - len(errors)} of {len(files)} images classified -> {output}")
    return PredictResult(output, len(files), tuple(errors))


def _run_spark(cfg: PredictConfig) -> PredictResult:
    """The ``engine=spark`` step: Spark reads ``cfg.images`` and scores it with the same pyfunc.

    The model is downloaded once here and shipped to the executors with the job
    (``SparkContext.addFile``), so they need neither the tracking server nor its credentials.
    """
    import tempfile

    from cars_ml.serving import spark_predict

    tracking.check_model_uri(cfg.model_uri)
    output = cfg.output_path
    with tracking.start_run("predict", tags={"step": "predict", "engine": "spark"}):
        tracking.log_params(
            {
                "model_uri": cfg.model_uri,
                "images": cfg.images,
                "batch_size": cfg.batch_size,
                "engine": cfg.engine,
                "spark_master": cfg.spark_master,
                "overwrite": cfg.overwrite,
            }
        )
        with tempfile.TemporaryDirectory(prefix="cars-ml-spark-model-") as tmp:
            model_dir = tracking.download_model(cfg.model_uri, Path(tmp) / "model")
            max_bytes = _max_image_bytes_of(model_dir)
            summary = spark_predict.score_files(
                spark_predict.SparkJob(
                    images=cfg.images,
                    model_dir=str(model_dir),
                    output=output,
                    master=cfg.spark_master,
                    batch_size=cfg.batch_size,
                    max_image_bytes=max_bytes,
                    suffixes=IMAGE_SUFFIXES,
                    overwrite=cfg.overwrite,
                )
            )
        tracking.log_metrics({"num_images": summary.num_images, "num_errors": summary.num_errors})
        tracking.set_tags({"output": output})
        if not summary.num_images:
            raise ValueError(
                f"no images at {cfg.images!r} (looked for {', '.join(IMAGE_SUFFIXES)}, any case)."
            )
    if summary.num_errors:
        print(f"\n[predict] {summary.num_errors} file(s) could not be classified:")
        for name, message in summary.first_errors:
            print(f"  {name}: {message}")
        if summary.num_errors > len(summary.first_errors):
            print(f"  ... and {summary.num_errors - len(summary.first_errors)} more (see `error`)")
    print(
        f"[predict] {summary.num_images - summary.num_errors} of {summary.num_images} images "
        f"classified on Spark ({cfg.spark_master}) -> {output} (Parquet)"
    )
    return PredictResult(
        Path(output), summary.num_images, tuple(n for n, _ in summary.first_errors)
    )
