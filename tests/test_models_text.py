"""open_clip text tower behind sam3's VETextEncoder contract; weights from local files only."""

import huggingface_hub.constants
import pytest
import torch
from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg, CustomTextCLIP
from safetensors.torch import save_file

from sambridge.models import CheckpointError
from sambridge.models.text_encoder import OpenClipTextEncoder

TINY_TEXT = {"width": 64, "heads": 2, "layers": 1}


def tiny_encoder(**kwargs) -> OpenClipTextEncoder:
    torch.manual_seed(0)
    kwargs.setdefault("model_name", "ViT-S-32")
    return OpenClipTextEncoder(d_model=32, text_cfg=TINY_TEXT, **kwargs)


def tiny_clip(custom_text: bool) -> torch.nn.Module:
    """A small open_clip CLIP (77-token context, like released checkpoints) in either layout."""
    torch.manual_seed(3)
    cls = CustomTextCLIP if custom_text else CLIP
    return cls(
        embed_dim=32,
        vision_cfg=CLIPVisionCfg(layers=1, width=32, head_width=16, patch_size=16, image_size=32),
        text_cfg=CLIPTextCfg(**TINY_TEXT, context_length=77),
    )


def test_output_follows_the_ve_text_encoder_contract():
    encoder = tiny_encoder()
    pad_mask, features, embeds = encoder(["red apple", "a very ripe green pear on a tree"], device="cpu")
    assert pad_mask.shape == (2, 32) and pad_mask.dtype == torch.bool
    assert features.shape == (32, 2, 32) and embeds.shape == (32, 2, 64)
    tokens = encoder.tokenizer(["red apple"], context_length=32)[0]
    assert torch.equal(pad_mask[0], tokens == 0)
    assert int((~pad_mask[0]).sum()) == 4  # <start> red apple <end>
    assert int((~pad_mask[1]).sum()) > 4


def test_frozen_tower_gets_no_gradient_but_the_resizer_does():
    encoder = tiny_encoder(frozen=True)
    encoder.train()
    assert not encoder.tower.training
    _, features, _ = encoder(["weed"], device="cpu")
    features.sum().backward()
    assert all(p.grad is None for p in encoder.tower.parameters())
    assert encoder.resizer.weight.grad is not None
    trainable = tiny_encoder(frozen=False)
    trainable(["weed"], device="cpu")[1].sum().backward()
    assert trainable.tower.token_embedding.weight.grad is not None


def test_vocabulary_cache_gives_identical_features_and_skips_the_tower():
    vocabulary = ["ripe apple", "weed", "crop row"]
    cached, plain = tiny_encoder(vocabulary=vocabulary), tiny_encoder()
    batch_sizes = []
    cached.tower.register_forward_hook(lambda module, args, out: batch_sizes.append(args[0].shape[0]))
    phrases = ["weed", "unseen phrase", "ripe apple", "weed"]
    for _ in range(2):
        got = cached(phrases, device="cpu")
        for a, b in zip(got, plain(phrases, device="cpu"), strict=True):
            assert torch.allclose(a, b, atol=1e-6)
    assert batch_sizes == [3, 1, 1]  # vocabulary once, then only the unseen phrase per call


@pytest.mark.parametrize("custom_text", [False, True], ids=["clip-layout", "custom-text-layout"])
def test_local_weight_file_loads_the_text_tower_only(tmp_path, custom_text):
    clip = tiny_clip(custom_text)
    path = tmp_path / "clip.pt"
    torch.save(clip.state_dict(), path)
    encoder = tiny_encoder(pretrained=path)
    source = clip.text if custom_text else clip
    assert torch.equal(encoder.tower.token_embedding.weight, source.token_embedding.weight)
    assert torch.equal(encoder.tower.positional_embedding, source.positional_embedding[:32])  # 77 -> 32
    assert torch.equal(encoder.tower.ln_final.weight, source.ln_final.weight)


def test_safetensors_weight_file_loads(tmp_path):
    clip = tiny_clip(custom_text=True)
    save_file({k: v.contiguous() for k, v in clip.state_dict().items()}, str(tmp_path / "clip.safetensors"))
    encoder = tiny_encoder(pretrained=tmp_path / "clip.safetensors")
    assert torch.equal(encoder.tower.token_embedding.weight, clip.text.token_embedding.weight)


def test_weight_file_with_a_missing_tower_key_names_it(tmp_path):
    state = tiny_clip(custom_text=False).state_dict()
    del state["ln_final.bias"]
    torch.save(state, tmp_path / "broken.pt")
    with pytest.raises(CheckpointError, match="missing keys \\(1\\): ln_final.bias"):
        tiny_encoder(pretrained=tmp_path / "broken.pt")


def test_missing_weight_file_names_the_path(tmp_path):
    with pytest.raises(CheckpointError, match=f"open_clip weight file not found: {tmp_path / 'x.pt'}"):
        tiny_encoder(pretrained=tmp_path / "x.pt")


@pytest.fixture
def empty_caches(tmp_path, monkeypatch):
    """Point the Hugging Face and open_clip URL caches at empty folders."""
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    return tmp_path


def test_uncached_pretrained_tag_fails_offline_with_a_clear_message(empty_caches):
    with pytest.raises(CheckpointError, match="ViT-B-32/openai are not in the local cache") as err:
        tiny_encoder(model_name="ViT-B-32", pretrained="openai")
    assert "timm/vit_base_patch32_clip_224.openai" in str(err.value)
    assert "ViT-B-32.pt" in str(err.value)  # the URL cache was checked too


def test_unknown_tag_lists_the_known_ones():
    with pytest.raises(ValueError, match="known tags: \\['datacompdr'\\]"):
        tiny_encoder(model_name="MobileCLIP-S1", pretrained="laion")


def test_cached_pretrained_tag_is_loaded_from_the_hub_cache(empty_caches):
    repo = empty_caches / "hf" / "models--timm--vit_base_patch32_clip_224.openai"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("abc123")
    (repo / "snapshots" / "abc123").mkdir(parents=True)
    clip = tiny_clip(custom_text=False)
    save_file(
        {k: v.contiguous() for k, v in clip.state_dict().items()},
        str(repo / "snapshots" / "abc123" / "open_clip_model.safetensors"),
    )
    encoder = tiny_encoder(model_name="ViT-B-32", pretrained="openai")
    assert torch.equal(encoder.tower.token_embedding.weight, clip.token_embedding.weight)


def test_phrases_must_be_a_list_of_strings():
    with pytest.raises(TypeError, match="list of phrases"):
        tiny_encoder()("red apple", device="cpu")
