"""The metric names every train run logs: one definition for training, registry and reports."""

METRIC_SCHEMA = (
    "val_f1_macro",
    "test_f1_macro",
    "test_f1_weighted",
    "test_accuracy",
    "test_top5_accuracy",
    "latency_ms_p50",
    "latency_ms_p95",
    "throughput_img_per_s",
    "model_size_mb",
    "num_params",
)
EDGE_HEADLINE = (
    "tflite_int8_size_mb",
    "tflite_int8_latency_ms_p50",
    "tflite_int8_test_f1_macro",
    "int8_f1_drop",
)
