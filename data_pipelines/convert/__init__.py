"""Converters from public annotation formats to sambridge shards (one module per format), with what they
share: ``common`` (the ``Converter`` interface, image reading, writing) and ``bands`` (multispectral images
-> 8-bit RGB)."""
