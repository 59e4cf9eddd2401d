import pytest
from torch import nn

from sambridge.models import create_model, list_models, register_model

VARIANTS = [
    "grounded_sam2_hiera_b+",
    "grounded_sam2_hiera_l",
    "grounded_sam2_hiera_s",
    "grounded_sam2_hiera_t",
    "grounded_sam2_tiny",
]


def test_builtin_variants_are_listed_and_filterable():
    assert set(VARIANTS) <= set(list_models())
    assert list_models("*hiera*") == [v for v in VARIANTS if "hiera" in v]
    assert list_models("no_such_*") == []


def test_unknown_name_lists_known_models():
    with pytest.raises(ValueError, match="unknown model 'grounded_sam9'") as err:
        create_model("grounded_sam9")
    for name in VARIANTS:
        assert name in str(err.value)


def test_duplicate_registration_is_refused_with_known_names():
    with pytest.raises(ValueError, match="already registered") as err:
        register_model("grounded_sam2_tiny")(lambda: nn.Identity())
    assert "grounded_sam2_hiera_t" in str(err.value)


def test_unknown_override_lists_accepted_ones():
    with pytest.raises(ValueError, match="does not take \\['imagesize'\\]") as err:
        create_model("grounded_sam2_tiny", imagesize=64)
    assert "image_size" in str(err.value) and "sam2_checkpoint" in str(err.value)


def test_teachers_take_no_sam2_checkpoint_and_grounding_passes_none():
    from sambridge.modules import GroundingModule

    assert GroundingModule(model="sam3_image_tiny").model.model_name == "sam3_image_tiny"
    with pytest.raises(ValueError, match="does not take \\['sam2_checkpoint'\\]"):
        create_model("sam3_image_tiny", sam2_checkpoint="sam2.1_hiera_tiny.pt")


def test_overrides_reach_the_builder(tiny_grounded_sam2):
    model = tiny_grounded_sam2(image_size=64)
    assert model.image_size == 64
    assert model.prompt_decoder.prompt_encoder.image_embedding_size == (4, 4)
