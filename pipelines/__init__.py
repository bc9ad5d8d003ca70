"""Ray Data pipelines: raw pose datasets -> Parquet sliding-window shards with a manifest."""
