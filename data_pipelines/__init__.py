"""Everything data: sample schema, shard writing, converters, synthetic data and the DataModule."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from data_pipelines.datamodule import ShardDataModule

__all__ = ["ShardDataModule"]


def __getattr__(name: str) -> Any:
    # imported on first use: Lightning takes seconds to import and the shard tools do not need it
    if name == "ShardDataModule":
        from data_pipelines.datamodule import ShardDataModule

        return ShardDataModule
    raise AttributeError(f"module 'data_pipelines' has no attribute {name!r}")
