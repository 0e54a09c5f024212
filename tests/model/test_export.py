"""TFLite export: the int8 file agrees with the float model, and the logged numbers recompute."""

from __future__ import annotations

import mlflow
import numpy as np
import pytest
from serving_helpers import SIZE, colour_classifier, colour_images
from sklearn.metrics import f1_score

from cars_ml import tracking
from cars_ml.export.tflite import (
    EDGE_METRIC_NAMES,
    LiteRTRunner,
    edge_metrics,
    evaluate_tflite,
    export_tflite,
    logits_output,
    measure_latency_ms,
)


@pytest.fixture(scope="module")
def trained():
    model, names = colour_classifier()
    test_images, test_labels = colour_images(90, seed=7)
    float_probs = model.predict(test_images.astype("float32"), verbose=0)
    float_f1 = f1_score(test_labels, float_probs.argmax(1), average="macro")
    assert float_f1 > 0.9, "the tiny colour model should have learned its task"
    return model, names, test_images, test_labels, float_probs, float_f1


def test_int8_agrees_with_float_and_logged_drop_recomputes(trained, tracking_uri, tmp_path):
    model, _, test_images, test_labels, float_probs, float_f1 = trained
    rep, _ = colour_images(60, seed=3)
    metrics, paths = edge_metrics(
        model, rep, test_images, test_labels, float_f1, tmp_path / "tflite", latency_runs=10
    )
    assert list(metrics) == list(EDGE_METRIC_NAMES)
    assert metrics["int8_agreement"] >= 0.95
    # A model this small is dominated by quantization metadata, so only check the sizes are real.
    assert metrics["tflite_int8_size_mb"] == pytest.approx(paths["int8"].stat().st_size / 1e6)
    assert metrics["tflite_float32_size_mb"] == pytest.approx(paths["float32"].stat().st_size / 1e6)
    assert all(np.isfinite(v) for v in metrics.values())

    # Log as the train step does, read back, and recompute from the exported file itself.
    with tracking.start_run("export-test") as run:
        tracking.log_metrics(metrics)
    logged = mlflow.get_run(run.info.run_id).data.metrics
    int8 = LiteRTRunner(paths["int8"])
    recomputed_f1 = evaluate_tflite(int8, test_images, test_labels)["f1_macro"]
    assert logged["int8_f1_drop"] == pytest.approx(float_f1 - recomputed_f1, abs=1e-9)
    assert logged["tflite_int8_test_f1_macro"] == pytest.approx(recomputed_f1, abs=1e-9)
    agreement = np.mean(int8.predict(test_images).argmax(1) == float_probs.argmax(1))
    assert logged["int8_agreement"] == pytest.approx(agreement, abs=1e-9)


def test_runners_take_uint8_pixels_and_return_probabilities(trained, tmp_path):
    model, _, test_images, _, float_probs, _ = trained
    rep, _ = colour_images(30, seed=4)
    paths = export_tflite(model, tmp_path, rep)
    for kind, tolerance in (("float32", 1e-4), ("int8", 0.1)):
        runner = LiteRTRunner(paths[kind], num_threads=1)
        probs = runner.predict(test_images[:37], batch_size=16)  # several and a ragged batch
        assert probs.shape == (37, 3) and probs.dtype == np.float32
        np.testing.assert_allclose(probs.sum(1), 1.0, atol=0.05)
        np.testing.assert_allclose(probs, float_probs[:37], atol=tolerance)
        single = runner.predict(test_images[:1])
        np.testing.assert_allclose(single, probs[:1], atol=1e-6)
        latency = measure_latency_ms(runner, test_images[0], n=5)
        assert 0 < latency["p50"] <= latency["p95"]
    int8 = LiteRTRunner(paths["int8"])
    assert np.dtype(int8._input["dtype"]) == np.uint8  # documented choice: uint8 in, uint8 out


def test_both_files_end_at_the_logits_and_runners_apply_the_softmax(trained, tmp_path):
    from ai_edge_litert.interpreter import Interpreter

    model, _, test_images, _, float_probs, _ = trained
    rep, _ = colour_images(30, seed=4)
    paths = export_tflite(model, tmp_path, rep)
    # The logits up to a constant per image, which the softmax cancels.
    expected = np.log(float_probs)
    expected -= expected.mean(1, keepdims=True)
    for kind, tolerance in (("float32", 1e-3), ("int8", 0.5)):
        interpreter = Interpreter(model_path=str(paths[kind]))
        assert "SOFTMAX" not in {op["op_name"] for op in interpreter._get_ops_details()}
        runner = LiteRTRunner(paths[kind])
        assert runner.output_name == "logits"
        logits = runner.outputs(test_images)
        np.testing.assert_allclose(logits - logits.mean(1, keepdims=True), expected, atol=tolerance)
        assert np.mean(logits.argmax(1) == float_probs.argmax(1)) >= 0.95
        softmax = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
        np.testing.assert_allclose(runner.predict(test_images), softmax, atol=1e-6)
    # A file that already ends at the logits is refused rather than cut again.
    with pytest.raises(ValueError, match="does not end in a softmax"):
        logits_output(paths["float32"].read_bytes())


def test_bad_arrays_are_refused(trained, tmp_path):
    model = trained[0]
    with pytest.raises(ValueError, match="must be uint8 RGB pixels"):
        export_tflite(model, tmp_path, np.zeros((2, SIZE, SIZE, 3), np.float32))
    with pytest.raises(ValueError, match="non-empty uint8 array"):
        export_tflite(model, tmp_path, np.zeros((0, SIZE, SIZE, 3), np.uint8))


def test_int8_from_the_float_flatbuffer_equals_the_converters(tmp_path):
    # The export quantizes the float32 flatbuffer it already has instead of converting the graph a
    # second time; both must give the same model, on a real backbone's ops too.
    import keras

    from cars_ml.export.quantize import int8_flatbuffer_from_float
    from cars_ml.export.tflite import (
        float32_flatbuffer,
        inference_function,
        int8_flatbuffer_converted,
    )
    from cars_ml.modeling import backbones

    keras.utils.set_random_seed(0)
    spec = backbones.get_backbone("mobilenet")
    backbone, _ = backbones.build_backbone(spec, 32, "none")
    model = backbones.build_classifier(spec, 32, backbone, backbones.build_head(1024, 5, 0.0, 0))
    rng = np.random.default_rng(0)
    rep = rng.integers(0, 256, (16, 32, 32, 3), dtype=np.uint8)
    images = rng.integers(0, 256, (24, 32, 32, 3), dtype=np.uint8)
    function = inference_function(model)
    fast = int8_flatbuffer_from_float(float32_flatbuffer(function), rep)
    slow = int8_flatbuffer_converted(function, rep)
    outputs = []
    for n, content in enumerate((fast, slow)):
        path = tmp_path / f"{n}.tflite"
        path.write_bytes(content)
        outputs.append(LiteRTRunner(path).predict(images))
    assert abs(len(fast) - len(slow)) < 4096  # the same model; metadata may differ
    np.testing.assert_array_equal(outputs[0], outputs[1])
