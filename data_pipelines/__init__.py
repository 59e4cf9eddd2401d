"""Everything data: sample schema, shard writing, converters, synthetic data and the DataModule."""
