"""Converters from public annotation formats to sambridge shards (one module per format)."""
