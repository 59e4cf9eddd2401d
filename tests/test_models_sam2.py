"""SAM2 builder: sizes, and official-format checkpoints saved from a model built by the sam2 package."""

import pytest
import torch
from sam2.build_sam import build_sam2 as sam2_package_build

from sambridge.models import CheckpointError
from sambridge.models.sam2_builder import (
    SAM2_CONFIGS,
    SAM2_TINY_OVERRIDES,
    build_sam2,
    check_image_size,
    image_size_overrides,
)

SIZE = 96


@pytest.fixture(scope="module")
def official_checkpoint(tmp_path_factory):
    """A tiny SAM2.1 built by the sam2 package itself, saved as {"model": state_dict}."""
    torch.manual_seed(1)
    model = sam2_package_build(
        SAM2_CONFIGS["sam2.1_hiera_t"],
        ckpt_path=None,
        device="cpu",
        hydra_overrides_extra=list(SAM2_TINY_OVERRIDES) + image_size_overrides(SIZE),
    )
    path = tmp_path_factory.mktemp("sam2") / "sam2.1_hiera_tiny.pt"
    torch.save({"model": model.state_dict()}, path)
    return path, model.state_dict()


def test_any_multiple_of_32_works_and_features_follow_the_size():
    model = build_sam2(image_size=SIZE, overrides=SAM2_TINY_OVERRIDES)
    features = model.image_encoder(torch.rand(1, 3, SIZE, SIZE))["backbone_fpn"]
    assert [tuple(f.shape[-2:]) for f in features] == [(24, 24), (12, 12), (6, 6)]
    assert model.sam_prompt_encoder.image_embedding_size == (6, 6)
    assert not model.sam_mask_decoder.dynamic_multimask_via_stability


@pytest.mark.parametrize("size", [100, 1008, 0, -32])
def test_sizes_that_are_not_multiples_of_32_are_refused(size):
    with pytest.raises(ValueError, match="multiple of 32"):
        check_image_size(size)


def test_grounded_model_refuses_a_bad_size(tiny_grounded_sam2):
    with pytest.raises(ValueError, match=r"multiple of 32.*got 120; try 96 or 128"):
        tiny_grounded_sam2(image_size=120)


def test_unknown_config_lists_known_ones():
    with pytest.raises(ValueError, match="sam2.1_hiera_b\\+"):
        build_sam2("sam2.1_hiera_xl")


def test_official_checkpoint_loads_into_every_sam2_part(official_checkpoint, tiny_grounded_sam2):
    path, state = official_checkpoint
    model = tiny_grounded_sam2(seed=5, image_size=SIZE, sam2_checkpoint=path)
    vision, decoder = model.vision, model.prompt_decoder
    pairs = {
        "image_encoder.trunk.": vision.trunk,
        "image_encoder.neck.": vision.sam2_neck,
        "sam_mask_decoder.": decoder.mask_decoder,
        "sam_prompt_encoder.": decoder.prompt_encoder,
    }
    for prefix, module in pairs.items():
        for name, value in module.state_dict().items():
            assert torch.equal(value, state[prefix + name]), prefix + name
    for name, value in vision.detector_neck.state_dict().items():  # the head's neck starts as SAM2's
        assert torch.equal(value, state["image_encoder.neck." + name])
    assert torch.equal(decoder.no_mem_embed, state["no_mem_embed"])


def _tampered(tmp_path, state, edit):
    state = dict(state)
    edit(state)
    path = tmp_path / "tampered.pt"
    torch.save({"model": state}, path)
    return path


def test_renamed_key_is_named_as_missing_and_unexpected(official_checkpoint, tmp_path):
    path, state = official_checkpoint
    key = "sam_mask_decoder.iou_token.weight"
    bad = _tampered(tmp_path, state, lambda s: s.__setitem__("sam_mask_decoder.iou_tokn.weight", s.pop(key)))
    with pytest.raises(CheckpointError) as err:
        build_sam2(image_size=SIZE, overrides=SAM2_TINY_OVERRIDES, checkpoint=bad)
    message = str(err.value)
    assert "missing keys (1): sam_mask_decoder.iou_token.weight" in message
    assert "unexpected keys (1): sam_mask_decoder.iou_tokn.weight" in message
    assert str(bad) in message


def test_extra_and_missing_keys_are_named(official_checkpoint, tmp_path):
    path, state = official_checkpoint
    extra = _tampered(tmp_path, state, lambda s: s.__setitem__("memory_encoder.extra", torch.zeros(1)))
    with pytest.raises(CheckpointError, match="unexpected keys \\(1\\): memory_encoder.extra"):
        build_sam2(image_size=SIZE, overrides=SAM2_TINY_OVERRIDES, checkpoint=extra)
    missing = _tampered(tmp_path, state, lambda s: s.pop("no_mem_embed"))
    with pytest.raises(CheckpointError, match="missing keys \\(1\\): no_mem_embed"):
        build_sam2(image_size=SIZE, overrides=SAM2_TINY_OVERRIDES, checkpoint=missing)


def test_checkpoint_of_another_architecture_names_the_shape_mismatch(official_checkpoint):
    path, _ = official_checkpoint
    with pytest.raises(CheckpointError, match="shape mismatches"):
        build_sam2(image_size=SIZE, checkpoint=path)  # real hiera_t widths vs the tiny checkpoint


def test_missing_file_names_the_path(tmp_path):
    with pytest.raises(CheckpointError, match=f"SAM2 checkpoint not found: {tmp_path / 'nope.pt'}"):
        build_sam2(image_size=SIZE, overrides=SAM2_TINY_OVERRIDES, checkpoint=tmp_path / "nope.pt")


def test_bare_state_dict_is_not_the_official_format(official_checkpoint, tmp_path):
    _, state = official_checkpoint
    torch.save(state, tmp_path / "bare.pt")
    with pytest.raises(CheckpointError, match="not in the official format"):
        build_sam2(image_size=SIZE, overrides=SAM2_TINY_OVERRIDES, checkpoint=tmp_path / "bare.pt")
