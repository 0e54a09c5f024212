"""The tf.data pipeline: 3-channel decoding, inclusive crops, shapes, augmentation for training."""

from __future__ import annotations

import functools

import numpy as np
import pytest
from PIL import Image

from cars_ml.data import ImageRecord
from cars_ml.data.pipeline import labels_array, load_images_array, make_dataset

SIZE = 16


def _solid(path, rgb, mode="RGB", fmt=None, size=(40, 30)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, rgb).convert(mode).save(path, format=fmt, quality=95)
    return str(path)


def test_grayscale_cmyk_rgba_and_rgb_decode_to_three_channels(tmp_path):
    records = [
        ImageRecord(_solid(tmp_path / "gray.jpg", (90, 90, 90), mode="L"), 0),
        ImageRecord(_solid(tmp_path / "cmyk.jpg", (200, 60, 30), mode="CMYK"), 1),
        ImageRecord(_solid(tmp_path / "rgba.png", (10, 120, 250), mode="RGBA", fmt="PNG"), 2),
        ImageRecord(_solid(tmp_path / "rgb.jpg", (30, 200, 80)), 3),
    ]
    with Image.open(records[1].path) as img:
        assert img.mode == "CMYK"  # the file really is CMYK
    images = load_images_array(records, SIZE)
    assert images.shape == (4, SIZE, SIZE, 3) and images.dtype == np.uint8
    means = images.reshape(4, -1, 3).mean(axis=1)
    expected = [(90, 90, 90), (200, 60, 30), (10, 120, 250), (30, 200, 80)]
    np.testing.assert_allclose(means, expected, atol=6)


@pytest.mark.parametrize("size", [12, 64])  # a downscale (antialiased) and an upscale
def test_greyscale_jpeg_gives_the_pixels_of_decoding_it_to_rgb_first(tmp_path, size):
    import tensorflow as tf

    rng = np.random.default_rng(1)
    grey = tmp_path / "grey.jpg"
    Image.fromarray(rng.integers(0, 256, (30, 40), dtype=np.uint8), "L").save(grey, quality=90)
    # The same decoded pixels as 3 channels, stored losslessly: the 3-channel path's input.
    rgb = tf.io.decode_jpeg(grey.read_bytes(), channels=3, dct_method="INTEGER_ACCURATE")
    as_rgb = tmp_path / "as_rgb.png"
    Image.fromarray(rgb.numpy()).save(as_rgb)
    for box in (None, (3, 2, 30, 25)):
        got = load_images_array(
            [ImageRecord(str(grey), 0, box), ImageRecord(str(as_rgb), 0, box)], size
        )
        assert got.shape == (2, size, size, 3)
        np.testing.assert_array_equal(got[0], got[1])


def test_crop_uses_inclusive_box(tmp_path):
    img = Image.new("RGB", (40, 30), (255, 0, 0))
    img.paste((0, 0, 255), (20, 10, 40, 30))  # blue block: x 20..39, y 10..29 inclusive
    path = tmp_path / "two tone ü.png"  # spaces and unicode in the path as well
    img.save(path)
    crop = load_images_array([ImageRecord(str(path), 0, (20, 10, 39, 29))], SIZE)[0]
    assert crop[..., 0].max() == 0 and crop[..., 2].min() == 255  # only blue, edges included
    whole = load_images_array([ImageRecord(str(path), 0)], SIZE)[0]
    assert whole[..., 0].max() == 255 and whole[..., 2].max() == 255


def _records(tmp_path, n=6):
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        path = tmp_path / f"{i}.jpg"
        Image.fromarray(rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)).save(path)
        out.append(ImageRecord(str(path), i % 3, (2, 2, 29, 21) if i % 2 else None))
    return out


def test_shapes_dtypes_and_order(tmp_path):
    records = _records(tmp_path)
    ds = make_dataset(records, SIZE, 4, training=False)
    batches = list(ds)
    assert [len(y) for _, y in batches] == [4, 2]
    images, labels = batches[0]
    assert images.shape == (4, SIZE, SIZE, 3) and images.dtype.name == "float32"
    assert labels.dtype.name == "int32"
    values = np.concatenate([x.numpy() for x, _ in batches])
    assert values.min() >= 0 and values.max() <= 255 and values.max() > 1  # no rescaling
    assert (
        np.concatenate([y.numpy() for _, y in batches]).tolist() == labels_array(records).tolist()
    )
    np.testing.assert_array_equal(values, load_images_array(records, SIZE).astype(np.float32))


def _epoch(ds):
    x, y = zip(*[(a.numpy(), b.numpy()) for a, b in ds], strict=True)
    return np.concatenate(x), np.concatenate(y)


def test_augmentation_only_when_training(tmp_path):
    records = _records(tmp_path)
    plain = load_images_array(records, SIZE).astype(np.float32)
    evaluated, _ = _epoch(make_dataset(records, SIZE, 3, training=False, augment_strength=1.0))
    np.testing.assert_array_equal(evaluated, plain)  # strength ignored outside training

    shuffled, labels = _epoch(make_dataset(records, SIZE, 3, training=True, shuffle_seed=3))
    order = sorted(range(len(records)), key=lambda i: float(shuffled[i].sum()))
    expected = sorted(range(len(records)), key=lambda i: float(plain[i].sum()))
    np.testing.assert_array_equal(shuffled[order], plain[expected])  # same images, new order
    assert sorted(labels.tolist()) == sorted(labels_array(records).tolist())

    ds = make_dataset(records, SIZE, 3, training=True, augment_strength=1.0, shuffle_seed=3)
    first, _ = _epoch(ds)
    second, _ = _epoch(ds)
    assert first.shape == plain.shape and first.min() >= 0 and first.max() <= 255
    assert not any(np.array_equal(first[i], plain[j]) for i in range(6) for j in range(6))
    assert not np.array_equal(first, second)  # new variants every epoch
    again, _ = _epoch(
        make_dataset(records, SIZE, 3, training=True, augment_strength=1.0, shuffle_seed=3)
    )
    np.testing.assert_array_equal(again, first)  # reproducible for a seed


def test_bad_arguments(tmp_path):
    records = _records(tmp_path, 2)
    with pytest.raises(ValueError, match="No records"):
        make_dataset([], SIZE, 2, training=False)
    with pytest.raises(ValueError, match="batch_size"):
        make_dataset(records, SIZE, 0, training=False)
    with pytest.raises(ValueError, match="augment_strength"):
        make_dataset(records, SIZE, 2, training=True, augment_strength=-1)
    assert load_images_array([], SIZE).shape == (0, SIZE, SIZE, 3)


def test_decoded_images_are_cached_on_disk_once_and_redecoded_when_a_file_changes(
    tmp_path, monkeypatch
):
    from cars_ml.data import image_cache, pipeline

    monkeypatch.setenv("CARS_ML_CACHE", str(tmp_path / "cache"))
    (tmp_path / "images").mkdir()
    records = _records(tmp_path / "images")
    decoded = []
    real = pipeline.decode_images
    monkeypatch.setattr(pipeline, "decode_images", lambda r, s: decoded.append(s) or real(r, s))
    first = load_images_array(records, SIZE)
    again = load_images_array(records, SIZE)
    assert decoded == [SIZE]  # the second read came from the cache
    np.testing.assert_array_equal(first, again)
    assert len(list((tmp_path / "cache" / "images").glob("*.npy"))) == 1
    epoch, _ = _epoch(make_dataset(records, SIZE, 4, training=False))
    np.testing.assert_array_equal(epoch, first.astype(np.float32))
    assert decoded == [SIZE]  # training and evaluation read the same cache

    # Same path, other pixels: the key follows the file, not its name.
    Image.new("RGB", (32, 24), (255, 0, 0)).save(records[0].path)
    changed = load_images_array(records, SIZE)
    assert decoded == [SIZE, SIZE]
    assert changed[0, ..., 0].min() > 200 and not np.array_equal(changed[0], first[0])

    # A damaged cache file is decoded again instead of trusted.
    for path in (tmp_path / "cache" / "images").glob("*.npy"):
        path.write_bytes(b"not an array")
    np.testing.assert_array_equal(load_images_array(records, SIZE), changed)
    assert decoded == [SIZE, SIZE, SIZE]
    assert not list((tmp_path / "cache" / "images").glob("*partial*"))
    assert image_cache.fits(len(records), SIZE)


def _decode_slowly_and_count(records, size, counter):
    import time

    with open(counter, "a") as out:
        out.write("decoded\n")
    time.sleep(0.5)  # long enough for the other process to ask for the same images
    return np.full((len(records), size, size, 3), 7, np.uint8)


def _cached_in_a_process(records, size, counter, cache, results, index):
    import os

    from cars_ml.data import image_cache

    os.environ["CARS_ML_CACHE"] = cache
    decode = functools.partial(_decode_slowly_and_count, counter=counter)
    results[index] = image_cache.cached(records, size, decode).sum()


def test_processes_asking_for_the_same_images_at_once_decode_them_once(tmp_path):
    # The pipeline's workers sharing a study ask for the same images at the same moment.
    import multiprocessing

    (tmp_path / "images").mkdir()
    records = _records(tmp_path / "images")
    counter = tmp_path / "decodes.txt"
    context = multiprocessing.get_context("fork")
    results = context.Array("d", 2)
    args = (records, SIZE, str(counter), str(tmp_path / "cache"), results)
    processes = [context.Process(target=_cached_in_a_process, args=(*args, i)) for i in range(2)]
    for process in processes:
        process.start()
    for process in processes:
        process.join(30)
    assert [p.exitcode for p in processes] == [0, 0]
    assert counter.read_text().splitlines() == ["decoded"]
    assert results[0] == results[1] > 0
