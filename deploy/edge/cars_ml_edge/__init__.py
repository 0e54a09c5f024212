"""cars-ml-edge: measure cars-ml's registered TFLite models on an edge device."""
