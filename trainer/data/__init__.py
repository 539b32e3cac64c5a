"""Data sources, preparation into TFRecord shards, and the input pipeline."""
