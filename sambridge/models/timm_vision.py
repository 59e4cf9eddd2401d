"""Vision adapters of the distillation students: timm trunks, and a grounding head on coarser levels.

::

    images --> trunk (timm features_only, or SAM2's Hiera) --> levels at strides 4, 8, 16, 32
                                                |
                       SAM2's FpnNeck (sine position encoding) --> det_feats/det_pos, sam2_feats/sam2_pos

``TimmVisionAdapter``: any ``timm`` model with ``features_only`` support whose feature pyramid
includes strides 4, 8, 16 and 32 (ConvNeXt, EfficientNet, MobileNet, ResNet, FastViT, ...). The
neck is SAM2's own ``FpnNeck`` (the one ``Sam2VisionAdapter`` wraps), so the grounding head and
SAM2's prompt decoder see exactly the feature contract they see on a Hiera trunk. Weights are
random unless ``pretrained_file`` names a local timm weight file (``.pth``, ``.safetensors``) for
the full classifier model; timm loads it strictly before wrapping the model for feature
extraction. Nothing is downloaded.

``head_min_stride=8`` (``HeadLevelsAdapter``, which both adapters are) feeds the grounding head
levels 8 and 16 only: its pixel decoder, which runs once per phrase, then skips the stride-4
stage (about half of a 512 px student's compute with ten phrases) and predicts masks at stride
8; SAM2's prompt decoder keeps the stride-4 features for refining boxes into fine masks.
"""

from __future__ import annotations

import os
from pathlib import Path

import timm
from sam2.modeling.backbones.image_encoder import FpnNeck
from sam2.modeling.position_encoding import PositionEmbeddingSine
from torch import Tensor, nn

from sambridge.models.checkpoint_io import CheckpointError
from sambridge.models.vision import NeckOutput, Sam2VisionAdapter

PYRAMID_STRIDES = (4, 8, 16, 32)
"""Strides the neck contract needs, highest resolution first."""

SAM2_TOP_DOWN_LEVELS = (2, 3)
"""SAM2.1's FPN: only the two lowest-resolution outputs get top-down features (the others are lateral)."""


class TimmTrunk(nn.Module):
    """A timm ``features_only`` model returning the stride 4/8/16/32 levels, highest resolution first.

    Args:
        model_name: timm model name (``timm.list_models()``), e.g. ``"convnext_atto"``.
        pretrained_file: Local timm weight file of the full model; ``None`` for random init.
        **timm_kwargs: Passed to ``timm.create_model`` (e.g. ``drop_path_rate``).
    """

    def __init__(
        self, model_name: str, pretrained_file: str | os.PathLike | None = None, **timm_kwargs
    ) -> None:
        super().__init__()
        options = dict(timm_kwargs)
        if pretrained_file is not None:
            path = Path(pretrained_file)
            if not path.is_file():
                raise CheckpointError(f"timm weight file for {model_name!r} not found: {path}")
            options.update(pretrained=True, pretrained_cfg_overlay={"file": str(path)})
        self.body = timm.create_model(model_name, features_only=True, **options)
        reductions = list(self.body.feature_info.reduction())
        missing = [s for s in PYRAMID_STRIDES if s not in reductions]
        if missing:
            raise ValueError(
                f"timm model {model_name!r} has feature strides {reductions}; the neck needs "
                f"{list(PYRAMID_STRIDES)} (missing {missing})"
            )
        self.level_index = [reductions.index(s) for s in PYRAMID_STRIDES]
        channels = self.body.feature_info.channels()
        self.channel_list = [channels[i] for i in reversed(self.level_index)]  # SAM2 order: lowest res first
        config = self.body.pretrained_cfg
        self.pixel_mean = tuple(float(v) for v in config["mean"])
        self.pixel_std = tuple(float(v) for v in config["std"])

    def forward(self, images: Tensor) -> list[Tensor]:
        levels = self.body(images)
        return [levels[i] for i in self.level_index]


def build_fpn_neck(channel_list: list[int], d_model: int) -> FpnNeck:
    """SAM2.1's FPN neck (nearest top-down fusion on the two coarsest levels) for ``channel_list``
    (lowest resolution first, as ``Hiera.channel_list``)."""
    position = PositionEmbeddingSine(num_pos_feats=d_model, normalize=True, scale=None, temperature=10000)
    return FpnNeck(
        position_encoding=position,
        d_model=d_model,
        backbone_channel_list=list(channel_list),
        fpn_top_down_levels=list(SAM2_TOP_DOWN_LEVELS),
        fpn_interp_model="nearest",
    )


class HeadLevelsAdapter(Sam2VisionAdapter):
    """``Sam2VisionAdapter`` whose grounding head gets the levels from ``head_min_stride`` to ``head_token_stride``.

    Args:
        trunk: A trunk returning strides 4, 8, 16, 32 (SAM2's Hiera, ``TimmTrunk``).
        neck: SAM2's ``FpnNeck`` for the trunk's channels.
        dual_neck: Give the grounding head its own neck (SAM2's prompt decoder keeps the other).
        head_min_stride: Finest level the grounding head sees (4, or 8 for a cheaper head whose
            masks come at stride 8); SAM2's prompt decoder always gets all levels.
        head_token_stride: Level whose tokens the fusion encoder and DETR decoder attend to: 16
            (SAM3's grid at 1,008 px is 72 x 72 tokens; SAM2's at 1,024 px 64 x 64), or 8 for small
            inputs (a 128 px image gives 16 x 16 tokens instead of 8 x 8).
    """

    def __init__(
        self, trunk: nn.Module, neck: nn.Module, dual_neck: bool = True, head_min_stride: int = 4,
        head_token_stride: int = 16,
    ) -> None:
        if head_min_stride not in PYRAMID_STRIDES[:2]:
            raise ValueError(f"head_min_stride must be 4 or 8, got {head_min_stride}")
        if head_token_stride not in PYRAMID_STRIDES[1:3] or head_token_stride <= head_min_stride:
            raise ValueError(f"head_token_stride must be 8 or 16 and above head_min_stride ({head_min_stride}), "
                             f"got {head_token_stride}")
        super().__init__(trunk, neck, dual_neck=dual_neck)
        self.head_min_stride = head_min_stride
        self.head_token_stride = head_token_stride

    def forward(self, images: Tensor) -> NeckOutput:
        det_feats, det_pos, sam2_feats, sam2_pos = super().forward(images)
        # one level past the token level: SAM3VLBackbone(scalp=1) drops the coarsest level it is given
        levels = slice(PYRAMID_STRIDES.index(self.head_min_stride), PYRAMID_STRIDES.index(self.head_token_stride) + 2)
        return det_feats[levels], det_pos[levels], sam2_feats, sam2_pos


class TimmVisionAdapter(HeadLevelsAdapter):
    """A timm trunk + SAM2's FPN neck(s), normalising with the trunk's own mean and std.

    Args:
        model_name: timm model name, e.g. ``"convnext_atto"``.
        d_model: Feature width (the grounding head's ``d_model``).
        pretrained_file: Local timm weight file for the trunk; ``None`` for random init.
        dual_neck: Give the grounding head its own neck (SAM2's prompt decoder keeps the other).
        head_min_stride: Finest level the grounding head sees (4 or 8).
        **timm_kwargs: Passed to ``timm.create_model``.
    """

    def __init__(
        self,
        model_name: str,
        d_model: int = 256,
        pretrained_file: str | os.PathLike | None = None,
        dual_neck: bool = True,
        head_min_stride: int = 4,
        **timm_kwargs,
    ) -> None:
        trunk = TimmTrunk(model_name, pretrained_file=pretrained_file, **timm_kwargs)
        super().__init__(trunk, build_fpn_neck(trunk.channel_list, d_model), dual_neck, head_min_stride)
        self.pixel_mean, self.pixel_std = trunk.pixel_mean, trunk.pixel_std
