"""Dataset-building configs for data_pipeline.ingest.build."""
