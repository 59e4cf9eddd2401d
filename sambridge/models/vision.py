"""Vision adapters: any image backbone behind the neck contract sam3's ``SAM3VLBackbone`` expects.

The grounding head never sees the backbone itself, only this contract (that of sam3's
``Sam3DualViTDetNeck.forward``)::

    adapter(images (B, 3, S, S), normalised) -> (det_feats, det_pos, sam2_feats, sam2_pos)

each a list of (B, d_model, S/s, S/s) maps for strides s = 4, 8, 16, 32, highest resolution first
(``SAM3VLBackbone(scalp=1)`` drops the stride-32 level). ``det_*`` feed the grounding head,
``sam2_*`` SAM2's prompt encoder + mask decoder (box refinement, geometric prompts); an adapter
without a separate SAM2 neck returns the detector features twice. A new backbone (e.g. a timm
``features_only`` model + FPN for a distillation student) subclasses ``VisionAdapter``.
"""

from __future__ import annotations

import copy
from abc import ABC, abstractmethod

from torch import Tensor, nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

NeckOutput = tuple[list[Tensor], list[Tensor], list[Tensor], list[Tensor]]


class VisionAdapter(nn.Module, ABC):
    """Base class of image backbones for ``GroundedSAM2``.

    Subclasses set ``d_model`` (feature width, equal to the head's) and the normalisation their
    weights expect (``pixel_mean``/``pixel_std`` for images in [0, 1]), and implement ``forward``.
    """

    d_model: int
    pixel_mean: tuple[float, float, float] = IMAGENET_MEAN
    pixel_std: tuple[float, float, float] = IMAGENET_STD

    @abstractmethod
    def forward(self, images: Tensor) -> NeckOutput:
        """Normalised (B, 3, S, S) images -> (det_feats, det_pos, sam2_feats, sam2_pos)."""


class Sam2VisionAdapter(VisionAdapter):
    """SAM2's Hiera trunk + FPN neck(s).

    With ``dual_neck`` the grounding head gets its own copy of SAM2's FPN neck (trainable
    independently), while the original neck keeps feeding SAM2's mask decoder, so geometric
    prompts and box refinement see the features SAM2 was trained on (like sam3's
    ``add_sam2_neck``). The trunk runs once either way.

    Args:
        trunk: ``sam2.modeling.backbones.hieradet.Hiera``.
        neck: SAM2's ``FpnNeck`` (its ``d_model`` is the features' width).
        dual_neck: Give the detector its own neck (initialised as a copy of ``neck``).
    """

    def __init__(self, trunk: nn.Module, neck: nn.Module, dual_neck: bool = True) -> None:
        super().__init__()
        self.d_model = neck.d_model
        self.trunk = trunk
        self.sam2_neck = neck
        self.detector_neck = copy.deepcopy(neck) if dual_neck else None

    def forward(self, images: Tensor) -> NeckOutput:
        levels = self.trunk(images)
        sam2_feats, sam2_pos = self.sam2_neck(levels)
        if self.detector_neck is None:
            return sam2_feats, sam2_pos, sam2_feats, sam2_pos
        det_feats, det_pos = self.detector_neck(levels)
        return det_feats, det_pos, sam2_feats, sam2_pos
