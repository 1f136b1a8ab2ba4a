"""Sentinel-1 tiles: schema, synthetic data, TFRecord/TFDS writer and the per-host input pipeline."""
