"""Build SAM2 from the ``sam2`` package's own hydra configs, at any image size, with strict loading."""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
from torch import nn

from sambridge.models.checkpoint_io import CheckpointError, load_state_dict_strict, read_weights

SAM2_CONFIGS = {
    "sam2.1_hiera_t": "configs/sam2.1/sam2.1_hiera_t.yaml",
    "sam2.1_hiera_s": "configs/sam2.1/sam2.1_hiera_s.yaml",
    "sam2.1_hiera_b+": "configs/sam2.1/sam2.1_hiera_b+.yaml",
    "sam2.1_hiera_l": "configs/sam2.1/sam2.1_hiera_l.yaml",
}
"""SAM2.1 config names -> hydra config files shipped inside the ``sam2`` package."""

SAM2_TINY_OVERRIDES = (
    "++model.image_encoder.trunk.embed_dim=16",
    "++model.image_encoder.trunk.num_heads=1",
    "++model.image_encoder.trunk.stages=[1,1,2,1]",
    "++model.image_encoder.trunk.global_att_blocks=[3]",
    "++model.image_encoder.trunk.window_spec=[4,4,4,4]",
    "++model.image_encoder.neck.backbone_channel_list=[128,64,32,16]",
    "++model.image_encoder.neck.d_model=64",
    "++model.image_encoder.neck.position_encoding.num_pos_feats=64",
    "++model.memory_attention.d_model=64",
    "++model.memory_attention.layer.d_model=64",
    "++model.memory_attention.layer.dim_feedforward=128",
    "++model.memory_attention.num_layers=1",
    "++model.memory_attention.layer.self_attention.embedding_dim=64",
    "++model.memory_attention.layer.cross_attention.embedding_dim=64",
    "++model.memory_attention.layer.cross_attention.kv_in_dim=32",
    "++model.memory_encoder.in_dim=64",
    "++model.memory_encoder.out_dim=32",
    "++model.memory_encoder.position_encoding.num_pos_feats=32",
    "++model.memory_encoder.fuser.layer.dim=64",
    "++model.memory_encoder.fuser.num_layers=1",
    "++model.memory_encoder.mask_downsampler.embed_dim=64",
)
"""Hydra overrides giving SAM2's real architecture at tiny width (~1.4M params, 64-d neck), for tests."""

SAM2_DEMO_OVERRIDES = (
    "++model.image_encoder.trunk.embed_dim=32",
    "++model.image_encoder.trunk.num_heads=2",
    "++model.image_encoder.trunk.stages=[1,2,4,1]",
    "++model.image_encoder.trunk.global_att_blocks=[4,6]",
    "++model.image_encoder.trunk.window_spec=[4,4,4,4]",
    "++model.image_encoder.neck.backbone_channel_list=[256,128,64,32]",
    *SAM2_TINY_OVERRIDES[6:],
)
"""The tiny architecture with a twice wider, deeper Hiera trunk (the CPU demo's model)."""

IMAGE_SIZE_STRIDE = 32
"""SAM2's Hiera trunk + FPN neck need square inputs whose side is a multiple of this."""


def check_image_size(image_size: int) -> None:
    """Raise ``ValueError`` unless ``image_size`` is a positive multiple of 32."""
    if not isinstance(image_size, int) or image_size <= 0 or image_size % IMAGE_SIZE_STRIDE:
        lower = max(IMAGE_SIZE_STRIDE, int(image_size) // IMAGE_SIZE_STRIDE * IMAGE_SIZE_STRIDE)
        raise ValueError(
            f"image_size must be a positive multiple of {IMAGE_SIZE_STRIDE} (SAM2's Hiera trunk and FPN "
            f"neck halve it five times), got {image_size!r}; try {lower} or {lower + IMAGE_SIZE_STRIDE}"
        )


def image_size_overrides(image_size: int) -> list[str]:
    """Hydra overrides for a non-default image size (the memory attention's RoPE grid follows it)."""
    check_image_size(image_size)
    grid = image_size // 16
    return [
        f"++model.image_size={image_size}",
        f"++model.memory_attention.layer.self_attention.feat_sizes=[{grid},{grid}]",
        f"++model.memory_attention.layer.cross_attention.feat_sizes=[{grid},{grid}]",
    ]


def build_sam2(
    config: str = "sam2.1_hiera_t",
    image_size: int = 1024,
    checkpoint: str | os.PathLike | None = None,
    overrides: Sequence[str] = (),
    device: str | torch.device = "cpu",
) -> nn.Module:
    """Build ``sam2.modeling.sam2_base.SAM2Base`` from the sam2 package's config.

    SAM2's mask-decoder post-processing (``dynamic_multimask_via_stability``) stays off: with
    ``multimask_output=False`` it would silently swap in a multimask token's output.

    Args:
        config: One of ``SAM2_CONFIGS`` (``sam2.1_hiera_t|s|b+|l``).
        image_size: Square input size, a multiple of 32.
        checkpoint: Optional official checkpoint (``{"model": state_dict}``), loaded strictly.
        overrides: Extra hydra overrides (e.g. ``SAM2_TINY_OVERRIDES``).
        device: Where to build the model (sam2 itself defaults to CUDA).
    """
    if config not in SAM2_CONFIGS:
        raise ValueError(f"unknown SAM2 config {config!r}; known: {sorted(SAM2_CONFIGS)}")
    from sam2.build_sam import build_sam2 as sam2_build

    model = sam2_build(
        SAM2_CONFIGS[config],
        ckpt_path=None,
        device=str(device),
        mode="train",
        hydra_overrides_extra=list(overrides) + image_size_overrides(image_size),
        apply_postprocessing=False,
    )
    if checkpoint is not None:
        load_sam2_checkpoint(model, checkpoint)
    return model


def load_sam2_checkpoint(model: nn.Module, path: str | os.PathLike) -> None:
    """Load an official SAM2 checkpoint (``{"model": state_dict}``) with a strict key check."""
    blob = read_weights(path, "SAM2 checkpoint")
    if not isinstance(blob, dict) or not isinstance(blob.get("model"), dict):
        keys = sorted(blob)[:5] if isinstance(blob, dict) else type(blob).__name__
        raise CheckpointError(
            f"SAM2 checkpoint {path} is not in the official format {{'model': state_dict}} "
            f"(top level: {keys})"
        )
    load_state_dict_strict(model, blob["model"], f"SAM2 checkpoint {path}")
