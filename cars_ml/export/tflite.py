"""Edge export: TFLite float32 and full-integer int8 files, run and measured with LiteRT.

No MLflow here: functions take a Keras model and numpy arrays and return paths and numbers;
the train step logs them.

The int8 model is fully integer (every op int8, ``TFLITE_BUILTINS_INT8``) with **uint8 input and
output**: a camera frame's uint8 RGB pixels go in unchanged (the input quantization is calibrated
on pixels in [0, 255], so its scale is about 1 and its zero point 0).

Both files end at the **logits** (the output tensor is named ``logits``); whoever reads them
applies the softmax (:func:`probabilities`). An int8 softmax would round every probability to a
step of 1/256, which ties the top two classes of many photos among 196 fine-grained classes and
lets the tie-break pick the wrong one; the logits keep the order the int8 arithmetic computed.
``LiteRTRunner`` applies each tensor's scale and zero point and the softmax, so callers always
pass uint8 pixels and get float probabilities for either file.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from cars_ml.export.quantize import int8_flatbuffer_from_float, samples

# Training images that calibrate the int8 ranges. A hundred leave a third of 196 classes unseen
# (docs/real-data.md, "int8 on real photos").
MAX_REPRESENTATIVE = 300
LOGITS = "logits"  # the output tensor's name in both files
EDGE_METRIC_NAMES = (
    "tflite_int8_size_mb",
    "tflite_float32_size_mb",
    "tflite_int8_latency_ms_p50",
    "tflite_float32_latency_ms_p50",
    "tflite_int8_test_f1_macro",
    "tflite_float32_test_f1_macro",
    "int8_f1_drop",
    "int8_agreement",
)


def _check_images(images: np.ndarray, what: str) -> np.ndarray:
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3 or len(images) == 0:
        raise ValueError(
            f"{what} must be a non-empty uint8 array (n, s, s, 3), got {images.shape}."
        )
    if images.dtype != np.uint8:
        raise ValueError(f"{what} must be uint8 RGB pixels in [0, 255], got dtype {images.dtype}.")
    return images


def inference_function(model, infer=None):
    """The model's inference call (``training=False``, any batch) as a concrete function: what
    both TFLite conversions and the serving engine's conversion start from.

    ``infer``, when given, is the model's already traced ``tf.function`` (float32 pixels of any
    batch in, probabilities out); its graph is reused instead of tracing the model again.

    ``TFLiteConverter.from_keras_model`` writes and re-reads a whole SavedModel on every call;
    converting the concrete function gives the same flatbuffers in well under half the time.
    The converter folds the variables into constants itself, so the function is not frozen
    here first (that did the work twice for byte-identical files; docs/performance.md).
    """
    import tensorflow as tf

    if infer is None:
        size = model.input_shape[1:]
        infer = tf.function(
            lambda image: model(image, training=False),
            input_signature=[tf.TensorSpec([None, *size], tf.float32, name="image")],
        )
    return infer.get_concrete_function()


class _DropNotice(logging.Filter):
    """Drops TensorFlow's notice that a function without ``trackable_obj`` takes the graph path.

    That path is the point: with ``trackable_obj`` the converter re-imports the model through
    its SavedModel path, 2.5x slower for the same flatbuffer. Tests check the files' outputs,
    so a TensorFlow release that changes this is caught.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return "trackable_obj" not in record.getMessage()


@contextlib.contextmanager
def _without_notice() -> Iterator[None]:
    notice = _DropNotice()
    absl = logging.getLogger("absl")
    absl.addFilter(notice)
    try:
        yield
    finally:
        absl.removeFilter(notice)


def _converter(function):
    import tensorflow as tf

    with _without_notice():  # The notice is logged when the converter is made.
        return tf.lite.TFLiteConverter.from_concrete_functions([function])


def _convert(converter) -> bytes:
    with _without_notice():
        return converter.convert()


def logits_output(flatbuffer: bytes) -> bytes:
    """``flatbuffer`` without its final softmax: its output is the logits, named ``logits``.

    The converter's int8 file ends in a softmax and a requantization to uint8; that
    requantization then takes the logits (same scale, zero point moved by 128, as the MLIR
    quantizer writes it). Any other ending is refused: its readers would take its output for
    logits.
    """
    from tensorflow.lite.python import schema_py_generated as schema
    from tensorflow.lite.tools import flatbuffer_utils

    model = flatbuffer_utils.convert_bytearray_to_object(bytearray(flatbuffer))
    graph, ops = model.subgraphs[0], model.subgraphs[0].operators

    def kind(op) -> int:
        code = model.operatorCodes[op.opcodeIndex]
        return max(code.builtinCode, code.deprecatedBuiltinCode)

    requantize = ops[-1] if ops and kind(ops[-1]) == schema.BuiltinOperator.QUANTIZE else None
    softmax = ops[-2] if requantize and len(ops) > 1 else (ops[-1] if ops else None)
    if softmax is None or kind(softmax) != schema.BuiltinOperator.SOFTMAX:
        raise ValueError(
            "the TFLite model does not end in a softmax; export a classifier whose last layer "
            "is a softmax Dense (cars_ml.modeling.backbones.build_head)."
        )
    logits = softmax.inputs[0]
    ops.remove(softmax)
    if requantize is None:
        graph.outputs = [logits]
    else:
        source, target = graph.tensors[logits], graph.tensors[requantize.outputs[0]]
        if (source.type, target.type) != (schema.TensorType.INT8, schema.TensorType.UINT8):
            raise ValueError(
                "the int8 TFLite model's output is not an int8 to uint8 requantization."
            )
        requantize.inputs = [logits]
        target.quantization.scale = list(source.quantization.scale)
        target.quantization.zeroPoint = [z + 128 for z in source.quantization.zeroPoint]
        logits = requantize.outputs[0]
    graph.tensors[logits].name = LOGITS.encode()
    # An operator code no operator uses still makes TFLite's calibrator look up its kernel.
    if all(op.opcodeIndex != softmax.opcodeIndex for g in model.subgraphs for op in g.operators):
        model.operatorCodes.pop(softmax.opcodeIndex)
        for op in (op for g in model.subgraphs for op in g.operators):
            op.opcodeIndex -= op.opcodeIndex > softmax.opcodeIndex
    return bytes(flatbuffer_utils.convert_object_to_bytearray(model))


def probabilities(outputs: np.ndarray, output_name: str) -> np.ndarray:
    """A TFLite file's dequantized ``outputs`` as probabilities: the softmax of logits (a file
    whose output is named ``logits``), any other output as it is."""
    if output_name != LOGITS:
        return outputs
    exp = np.exp(outputs - outputs.max(axis=-1, keepdims=True))
    return (exp / exp.sum(axis=-1, keepdims=True)).astype(np.float32)


def float32_flatbuffer(function) -> bytes:
    """A float32 TFLite flatbuffer of an :func:`inference_function`, ending at the logits."""
    return logits_output(_convert(_converter(function)))


def int8_flatbuffer_converted(function, representative: np.ndarray) -> bytes:
    """The same int8 flatbuffer through ``TFLiteConverter`` (converts the graph again)."""
    import tensorflow as tf

    converter = _converter(function)
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.representative_dataset = lambda: samples(representative)
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    converter.inference_input_type = tf.uint8
    converter.inference_output_type = tf.uint8
    return logits_output(_convert(converter))


def int8_flatbuffer(float_flatbuffer: bytes, function, representative: np.ndarray) -> bytes:
    """Int8 from the float32 flatbuffer when TensorFlow's calibrator is importable, else
    through the converter."""
    try:
        return int8_flatbuffer_from_float(float_flatbuffer, representative)
    except ImportError as exc:
        logging.getLogger(__name__).warning(
            "Quantizing through the converter (%s); the export takes longer.", exc
        )
        return int8_flatbuffer_converted(function, representative)


def export_tflite(
    model, out_dir: str | Path, representative: np.ndarray, infer=None
) -> dict[str, Path]:
    """Write ``model_float32.tflite`` and ``model_int8.tflite`` into ``out_dir``.

    ``representative`` holds uint8 training images (n, s, s, 3) used to calibrate int8 ranges;
    at most ``MAX_REPRESENTATIVE`` are used. ``infer``: see :func:`inference_function`.
    """
    rep = _check_images(representative, "representative")[:MAX_REPRESENTATIVE]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"float32": out / "model_float32.tflite", "int8": out / "model_int8.tflite"}
    function = inference_function(model, infer)
    content = float32_flatbuffer(function)
    paths["float32"].write_bytes(content)
    paths["int8"].write_bytes(int8_flatbuffer(content, function, rep))
    return paths


class LiteRTRunner:
    """Run a ``.tflite`` classifier with the LiteRT interpreter: uint8 pixels in, floats out."""

    def __init__(self, path: str | Path, num_threads: int = 1):
        from ai_edge_litert.interpreter import Interpreter

        self.path = Path(path)
        self._interpreter = Interpreter(model_path=str(self.path), num_threads=num_threads)
        self._input = self._interpreter.get_input_details()[0]
        self._output = self._interpreter.get_output_details()[0]
        self.output_name = self._output["name"]
        self.image_size = int(self._input["shape"][1])
        self._batch = int(self._input["shape"][0])
        self._interpreter.allocate_tensors()

    def _resize(self, batch: int) -> None:
        if batch != self._batch:
            shape = [batch, self.image_size, self.image_size, 3]
            self._interpreter.resize_tensor_input(self._input["index"], shape)
            self._interpreter.allocate_tensors()
            self._batch = batch

    def _quantize(self, images: np.ndarray) -> np.ndarray:
        dtype = np.dtype(self._input["dtype"])
        scale, zero_point = self._input["quantization"]
        if dtype == np.float32:
            return images.astype(np.float32)
        if scale == 0:  # Not quantized: an integer input that takes pixels as they are.
            return images.astype(dtype)
        info = np.iinfo(dtype)
        q = np.round(images.astype(np.float32) / scale + zero_point)
        return np.clip(q, info.min, info.max).astype(dtype)

    def _dequantize(self, values: np.ndarray) -> np.ndarray:
        scale, zero_point = self._output["quantization"]
        if np.issubdtype(values.dtype, np.floating) or scale == 0:
            return values.astype(np.float32)
        return (values.astype(np.float32) - zero_point) * np.float32(scale)

    def predict(self, images: np.ndarray, batch_size: int = 32) -> np.ndarray:
        """Probabilities ``(n, num_classes)`` for uint8 RGB images ``(n, s, s, 3)``."""
        return probabilities(self.outputs(images, batch_size), self.output_name)

    def outputs(self, images: np.ndarray, batch_size: int = 32) -> np.ndarray:
        """The file's dequantized outputs (its logits) for uint8 RGB images ``(n, s, s, 3)``."""
        images = _check_images(images, "images")
        if images.shape[1:3] != (self.image_size, self.image_size):
            raise ValueError(
                f"images are {images.shape[1]}x{images.shape[2]} but {self.path.name} takes "
                f"{self.image_size}x{self.image_size}; resize them first."
            )
        outputs = []
        for start in range(0, len(images), batch_size):
            chunk = images[start : start + batch_size]
            self._resize(len(chunk))
            self._interpreter.set_tensor(self._input["index"], self._quantize(chunk))
            self._interpreter.invoke()
            outputs.append(self._dequantize(self._interpreter.get_tensor(self._output["index"])))
        return np.concatenate(outputs, axis=0)


def measure_latency_ms(
    runner: LiteRTRunner, image: np.ndarray, n: int = 50, warmup: int = 5
) -> dict[str, float]:
    """Batch-1 latency percentiles (ms) of ``runner`` on one uint8 image ``(s, s, 3)``."""
    from cars_ml.measure.benchmark import percentiles_ms

    if n <= 0:
        raise ValueError(f"n must be > 0, got {n}.")
    one = np.asarray(image)[None] if np.ndim(image) == 3 else np.asarray(image)[:1]
    timing = percentiles_ms(lambda: runner.predict(one), warmup=warmup, runs=n)
    return {"p50": timing["p50"], "p95": timing["p95"]}


def _scores(labels: np.ndarray, preds: np.ndarray) -> dict[str, float]:
    from sklearn.metrics import accuracy_score, f1_score

    # Same definition as the float model's test_f1_macro: macro over the classes present.
    labels = np.asarray(labels)
    f1 = f1_score(labels, preds, average="macro", labels=np.unique(labels), zero_division=0)
    return {"f1_macro": float(f1), "accuracy": float(accuracy_score(labels, preds))}


def evaluate_tflite(runner: LiteRTRunner, images: np.ndarray, labels: np.ndarray) -> dict:
    """Macro-F1 and accuracy of a LiteRT model on labelled uint8 images."""
    return _scores(labels, runner.predict(images).argmax(axis=1))


def _keras_predictions(model, images: np.ndarray, batch_size: int = 32) -> np.ndarray:
    import tensorflow as tf

    size = images.shape[1]
    spec = tf.TensorSpec([None, size, size, 3], tf.float32)

    @tf.function(input_signature=[spec])
    def infer(x):
        return model(x, training=False)

    chunks = [
        infer(tf.constant(images[i : i + batch_size], tf.float32)).numpy()
        for i in range(0, len(images), batch_size)
    ]
    return np.concatenate(chunks, axis=0).argmax(axis=1)


def edge_metrics(
    model,
    rep_images: np.ndarray,
    test_images: np.ndarray,
    test_labels: np.ndarray,
    float_test_f1: float,
    out_dir: str | Path,
    *,
    latency_runs: int = 50,
    keras_test_preds: np.ndarray | None = None,
    infer=None,
) -> tuple[dict[str, float], dict[str, Path]]:
    """Export both files, then measure size, 1-thread latency, test macro-F1 and agreement.

    ``int8_f1_drop`` is ``float_test_f1`` (the Keras model's test macro-F1) minus the int8
    file's; ``int8_agreement`` is the fraction of test images whose int8 top-1 class equals the
    Keras model's. ``keras_test_preds`` (top-1 classes of the Keras model on ``test_images``)
    and ``infer`` (see :func:`inference_function`) each spare a trace of the model when given.
    """
    test_images = _check_images(test_images, "test_images")
    if len(test_labels) != len(test_images):
        raise ValueError(f"{len(test_labels)} test labels for {len(test_images)} test images.")
    paths = export_tflite(model, out_dir, rep_images, infer)
    # The caller usually has the Keras predictions already; tracing the model again for them
    # costs seconds to minutes on large backbones.
    keras_preds = (
        keras_test_preds if keras_test_preds is not None else _keras_predictions(model, test_images)
    )
    metrics: dict[str, float] = {}
    for kind, path in paths.items():
        runner = LiteRTRunner(path, num_threads=1)
        preds = runner.predict(test_images).argmax(axis=1)
        metrics[f"tflite_{kind}_size_mb"] = path.stat().st_size / 1e6
        latency = measure_latency_ms(runner, test_images[0], n=latency_runs)
        metrics[f"tflite_{kind}_latency_ms_p50"] = latency["p50"]
        metrics[f"tflite_{kind}_test_f1_macro"] = _scores(test_labels, preds)["f1_macro"]
        if kind == "int8":
            metrics["int8_agreement"] = float(np.mean(preds == keras_preds))
    metrics["int8_f1_drop"] = float(float_test_f1) - metrics["tflite_int8_test_f1_macro"]
    return {name: metrics[name] for name in EDGE_METRIC_NAMES}, paths
