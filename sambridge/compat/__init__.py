"""Small, documented compatibility patches for pinned third-party packages."""

from sambridge.compat.sam3 import apply_sam3_compat

__all__ = ["apply_sam3_compat"]
