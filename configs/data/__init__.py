"""Dataset-building configs for data_pipeline.build."""
