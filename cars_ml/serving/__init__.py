"""What a served model needs, and nothing from training: decoding, limits, the pyfunc model."""
