"""Tiny real Keras classifiers and request payloads shared by the serving and export tests."""

from __future__ import annotations

import base64
from pathlib import Path

import keras
import numpy as np

from cars_ml.modeling import backbones

SIZE = 32
CAR_NAMES = ["AM General Hummer SUV 2000", "Acura RL Sedan 2012", "Audi R8 Coupe 2012"]
COLOURS = {"red": (210, 40, 40), "green": (40, 190, 60), "blue": (40, 60, 210)}


def tiny_mobilenet(class_names=CAR_NAMES, size: int = SIZE, seed: int = 0) -> keras.Model:
    """The project's MobileNet classifier with random weights at a tiny size.

    Random MobileNet features vanish at inference, so every image gets the same output; a random
    head bias makes that output distinct per class rather than uniform.
    """
    keras.utils.set_random_seed(seed)
    spec = backbones.get_backbone("mobilenet")
    backbone, _ = backbones.build_backbone(spec, size, "none")
    head = backbones.build_head(backbone.output_shape[-1], len(class_names), 0.1, 0)
    head.get_layer("probabilities").bias.assign(
        np.random.default_rng(seed).normal(0, 1, len(class_names)).astype("float32")
    )
    return backbones.build_classifier(spec, size, backbone, head)


def colour_images(n: int, seed: int, size: int = SIZE) -> tuple[np.ndarray, np.ndarray]:
    """Noisy solid-colour uint8 images and their class ids (red, green, blue)."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, len(COLOURS), n)
    means = np.array(list(COLOURS.values()), dtype=float)[labels][:, None, None, :]
    images = means + rng.normal(0, 20, (n, size, size, 3))
    return np.clip(images, 0, 255).astype(np.uint8), labels


def colour_classifier(size: int = SIZE, seed: int = 0) -> tuple[keras.Model, list[str]]:
    """A small conv net, assembled like the product's classifiers, trained to tell colours apart.

    It has the ops that matter for int8 (conv, depthwise conv, BatchNorm, ReLU6, pooling,
    softmax) and learns in seconds, unlike a from-scratch MobileNet.
    """
    keras.utils.set_random_seed(seed)
    spec = backbones.get_backbone("mobilenet")  # for its "tf" preprocessing
    layers = keras.layers
    backbone = keras.Sequential(
        [
            keras.Input((size, size, 3)),
            layers.Conv2D(8, 3, strides=2, padding="same", use_bias=False),
            layers.BatchNormalization(momentum=0.5),
            layers.ReLU(6.0),
            layers.DepthwiseConv2D(3, padding="same"),
            layers.Conv2D(16, 1, activation="relu"),
            layers.GlobalAveragePooling2D(),
        ],
        name="tiny_backbone",
    )
    head = backbones.build_head(16, len(COLOURS), 0.0, 0)
    model = backbones.build_classifier(spec, size, backbone, head)
    images, labels = colour_images(240, seed, size)
    model.compile(keras.optimizers.Adam(0.01), "sparse_categorical_crossentropy")
    model.fit(images.astype("float32"), labels, epochs=8, batch_size=16, verbose=0)
    return model, list(COLOURS)


def b64_file(path: Path) -> str:
    return base64.b64encode(Path(path).read_bytes()).decode("ascii")


def log_classifier(model, class_names, size: int, **artifact_options):
    """Log ``model`` as the serving pyfunc in the active run, as the train step does."""
    from cars_ml import tracking
    from cars_ml.serving.package import serving_model

    with serving_model(model, class_names, size, **artifact_options) as files:
        return tracking.log_pyfunc_model(files)


def register_champion(model, class_names, size: int = SIZE, name: str = "stanford-cars-classifier"):
    """Log ``model`` as the serving pyfunc, register it and point the ``champion`` alias at it.

    The alias is set with ``MlflowClient`` directly: this is test set-up, not promotion.
    """
    import mlflow

    from cars_ml import tracking

    with tracking.start_run("serving-e2e"):
        info = log_classifier(model, class_names, size)
    version = tracking.register_model(info.model_uri, name, {"test": "serving"})
    mlflow.MlflowClient().set_registered_model_alias(name, "champion", version.version)
    return version
