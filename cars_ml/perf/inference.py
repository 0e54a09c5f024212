"""Batch-1 inference: our serving path vs ``model.predict`` vs the original work's method."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from cars_ml.measure.timing import interleaved_medians
from cars_ml.perf.inputs import file_base64, photo_pixels


def seed_method(model, path: Path, image_size: int) -> np.ndarray:
    """The original work's per-image inference: PIL load from disk, resize, ``model.predict``.

    Our models carry their preprocessing as a layer, so the pixels go in as they are; the
    original applied ``preprocess_input`` in numpy first, the same arithmetic in another place.
    """
    with Image.open(path) as image:
        pixels = image.convert("RGB").resize((image_size, image_size))
    batch = np.asarray(pixels, dtype=np.float32)[None]
    return model.predict(batch, verbose=0)


def compare_inference(
    classifier, pyfunc, photo: Path, *, runs: int = 100, warmup: int = 10
) -> dict[str, float]:
    """Median batch-1 latency (ms) of four paths on one photo, measured side by side.

    - ``inference_ms_ours``: ``CarsClassifier.predict_images``, the inference serving runs
      after decoding (its engine, LiteRT by default, is ``classifier.engine``), on uint8 pixels.
    - ``inference_ms_ours_tensorflow``: the same with ``engine="tensorflow"`` (the compiled
      ``tf.function`` that served before LiteRT, and the fallback).
    - ``inference_ms_ours_pyfunc_base64``: the whole ``pyfunc.predict`` on a base64 JPEG as the
      endpoint receives it (MLflow wrapper, decode, resize, inference, top-k table).
    - ``inference_ms_keras_predict``: ``model.predict`` on the same pixels, what MLflow's stock
      Keras flavor does.
    - ``inference_ms_seed_method``: :func:`seed_method`, file to prediction.
    """
    from cars_ml.serving.model import CarsClassifier

    size = classifier.image_size
    model = classifier.model
    tf_path = CarsClassifier().setup(model, classifier.class_names, size, engine="tensorflow")
    pixels = photo_pixels(photo, size)[None]
    floats = pixels.astype(np.float32)
    frame = pd.DataFrame({"image": [file_base64(photo)]})
    # All four must agree before their speed means anything.
    reference = classifier.predict_images(pixels)
    gap = max(
        float(np.max(np.abs(model.predict(floats, verbose=0) - reference))),
        float(np.max(np.abs(tf_path.predict_images(pixels) - reference))),
    )
    same_top = int(pyfunc.predict(frame)["class_id"].iloc[0]) == int(np.argmax(reference[0]))
    if gap > 1e-4 or not same_top:
        raise RuntimeError(
            f"the inference paths disagree (max probability gap {gap:.2e}, same top-1: "
            f"{same_top}); a speed comparison between them would be meaningless."
        )
    medians = interleaved_medians(
        {
            "ours": lambda: classifier.predict_images(pixels),
            "ours_tensorflow": lambda: tf_path.predict_images(pixels),
            "ours_pyfunc_base64": lambda: pyfunc.predict(frame),
            "keras_predict": lambda: model.predict(floats, verbose=0),
            "seed_method": lambda: seed_method(model, photo, size),
        },
        runs=runs,
        warmup=warmup,
    )
    metrics = {f"inference_ms_{name}": value for name, value in medians.items()}
    metrics["speedup_vs_keras_predict"] = medians["keras_predict"] / medians["ours"]
    metrics["speedup_vs_seed_method"] = medians["seed_method"] / medians["ours"]
    metrics["speedup_pyfunc_base64_vs_seed_method"] = (
        medians["seed_method"] / medians["ours_pyfunc_base64"]
    )
    return metrics
