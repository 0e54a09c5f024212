"""CPU kernels: a backbone's training step with TensorFlow's oneDNN kernels off and on, and
with oneDNN on but without grappler (what runs of few steps do, ``cars_ml.modeling.graph_build``).

TensorFlow reads ``TF_ENABLE_ONEDNN_OPTS`` once, when it is imported, and turns oneDNN on by
default only on CPUs with AVX-512 VNNI or AMX; the entry points turn it on everywhere
(``entrypoints/_common.py``). Each setting therefore runs in its own child process
(``python -m cars_ml.perf.cpu_kernels``); the two settings take turns for ``rounds`` rounds and
each keeps its fastest round, so both see the same machine load.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Sequence

# Name: (TF_ENABLE_ONEDNN_OPTS, grappler). Metric names keep "onednn_off" / "onednn_on".
SETTINGS = {"off": ("0", "on"), "on": ("1", "on"), "on_grappler_off": ("1", "off")}
CHILD_TIMEOUT_S = 900


def step_seconds(model: str, image_size: int, steps: int, batch_size: int) -> dict[str, float]:
    """Time one backbone's training step in this process (with its current oneDNN setting).

    The classifier is built and compiled as ``train.fit`` does (random weights, optimizer built
    before tracing), fed random pixels. Returns the first step (tracing included), the fastest
    of two epochs of ``steps`` steps, per step, and one batch of inference.
    """
    import keras
    import numpy as np
    import tensorflow as tf

    from cars_ml.modeling import backbones
    from cars_ml.modeling.optimizers import FusedAdam
    from cars_ml.training.fit import compile_for_training, inference_fn

    keras.utils.set_random_seed(0)
    spec = backbones.get_backbone(model)
    backbone, _ = backbones.build_backbone(spec, image_size, "none")
    backbone.trainable = True
    classes = 10
    head = backbones.build_head(backbone.output_shape[-1], classes, 0.3, 0)
    classifier = backbones.build_classifier(spec, image_size, backbone, head)
    compile_for_training(classifier, FusedAdam(1e-3), loss="categorical_crossentropy")
    rng = np.random.default_rng(0)
    count = steps * batch_size
    pixels = rng.integers(0, 256, (count, image_size, image_size, 3)).astype("float32")
    labels = keras.utils.to_categorical(rng.integers(0, classes, count), classes)
    data = tf.data.Dataset.from_tensor_slices((pixels, labels)).batch(batch_size).cache()
    start = time.perf_counter()
    classifier.fit(data.take(1), epochs=1, verbose=0, shuffle=False)
    first = time.perf_counter() - start
    epochs = []
    for _ in range(2):
        start = time.perf_counter()
        classifier.fit(data, epochs=1, verbose=0, shuffle=False)
        epochs.append((time.perf_counter() - start) / steps)
    infer = inference_fn(classifier)
    infer(pixels[:batch_size])  # Traced before the clock runs.
    start = time.perf_counter()
    infer(pixels[:batch_size])
    return {
        "first_step_s": first,
        "train_step_s": min(epochs),
        "infer_batch_s": time.perf_counter() - start,
    }


def _child(
    model: str, image_size: int, steps: int, batch_size: int, onednn: str, grappler: str
) -> dict:
    env = {**os.environ, "TF_ENABLE_ONEDNN_OPTS": onednn, "TF_CPP_MIN_LOG_LEVEL": "2"}
    args = [
        sys.executable,
        "-m",
        __name__,
        model,
        str(image_size),
        str(steps),
        str(batch_size),
        grappler,
    ]
    proc = subprocess.run(args, env=env, capture_output=True, text=True, timeout=CHILD_TIMEOUT_S)
    if proc.returncode != 0:
        raise RuntimeError(
            f"the cpu_kernels child for {model} (TF_ENABLE_ONEDNN_OPTS={onednn}, grappler "
            f"{grappler}) failed with exit code {proc.returncode}:\n{proc.stderr[-2000:]}"
        )
    return json.loads(proc.stdout.strip().splitlines()[-1])


def compare_cpu_kernels(
    models: Sequence[str], *, steps: int = 6, batch_size: int = 32, rounds: int = 2
) -> dict[str, float]:
    """Per model (at its demo image size): seconds per training step with oneDNN off and on,
    the first step (tracing), batch inference, and ``onednn_train_speedup_<model>`` (off / on);
    the same with oneDNN on and grappler off (``..._onednn_on_grappler_off``), with
    ``no_grappler_first_step_speedup_<model>`` and ``no_grappler_train_step_ratio_<model>``.
    """
    from cars_ml.modeling import backbones

    metrics: dict[str, float] = {}
    for model in models:
        spec = backbones.get_backbone(model)
        size = backbones.resolve_image_size(spec, backbones.AUTO_SIZE, synthetic=True)
        best: dict[str, dict[str, float]] = {}
        for _ in range(rounds):
            for name, (onednn, grappler) in SETTINGS.items():
                result = _child(model, size, steps, batch_size, onednn, grappler)
                kept = best.setdefault(name, result)
                best[name] = {k: min(v, kept[k]) for k, v in result.items()}
        for name, result in best.items():
            for key, value in result.items():
                metrics[f"{key}_{model}_onednn_{name}"] = value
        metrics[f"onednn_train_speedup_{model}"] = (
            best["off"]["train_step_s"] / best["on"]["train_step_s"]
        )
        # Skipping grappler: how much sooner the first step ends, and what a step costs then.
        metrics[f"no_grappler_first_step_speedup_{model}"] = (
            best["on"]["first_step_s"] / best["on_grappler_off"]["first_step_s"]
        )
        metrics[f"no_grappler_train_step_ratio_{model}"] = (
            best["on_grappler_off"]["train_step_s"] / best["on"]["train_step_s"]
        )
    return metrics


if __name__ == "__main__":
    name, size, n_steps, batch = sys.argv[1], *map(int, sys.argv[2:5])
    from cars_ml.modeling.graph_build import set_grappler

    set_grappler(sys.argv[5] == "on")
    print(json.dumps(step_seconds(name, size, n_steps, batch)), flush=True)
