"""Fine-tuning modes and LoRA (peft): what trains, adapter export/reload, merge."""

import pytest
import torch
from safetensors import safe_open

from sambridge.losses import GroundingLoss
from sambridge.models import CheckpointError
from sambridge.models.lora import (
    LoraSettings,
    apply_finetune_mode,
    apply_lora,
    has_lora,
    load_adapters,
    merge_lora,
    save_adapters,
)

SETTINGS = LoraSettings(rank=4, alpha=8.0, head=True)


@pytest.fixture
def base(tiny_grounded_sam2):
    """Same weights on every call: the 'freshly built base' adapters are exported from and loaded onto."""
    return lambda: tiny_grounded_sam2(seed=0, freeze_text=True)


def one_step(model, batch, lr=1e-2):
    model.train()
    optimiser = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses = GroundingLoss()(model(batch.images, batch.phrases, batch.query_image, targets=batch), batch)
    losses["loss"].backward()
    optimiser.step()
    return model.eval()


def outputs(model, batch):
    with torch.no_grad():
        return model(batch.images, batch.phrases, batch.query_image)


@pytest.fixture
def lora_trained(base, grounding_batch):
    """(base weights before, LoRA model after one optimiser step)."""
    model = base()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    apply_finetune_mode(model, "lora", SETTINGS)
    return before, one_step(model, grounding_batch)


def test_targets_are_hiera_attention_mask_decoder_attention_and_head_attention(base):
    model = apply_lora(base(), SETTINGS)
    adapted = sorted({n.rsplit(".lora_A", 1)[0] for n, _ in model.named_modules() if n.endswith(".lora_A")})
    trunk = [n for n in adapted if ".trunk.blocks." in n]
    decoder = [n for n in adapted if n.startswith("prompt_decoder.mask_decoder.transformer.")]
    head = [n for n in adapted if n.startswith(("detector.transformer.", "detector.geometry_encoder."))]
    blocks = len(model.vision.trunk.blocks)
    assert len(trunk) == 2 * blocks and all(n.endswith((".attn.qkv", ".attn.proj")) for n in trunk)
    assert len(decoder) == 4 * (3 * 2 + 1)  # q, k, v, out of 3 attentions x 2 layers + final attention
    assert {n.rsplit(".", 1)[1] for n in head} >= {"self_attn", "cross_attn", "ca_text", "cross_attn_image"}
    assert len(adapted) == len(trunk) + len(decoder) + len(head)
    with pytest.raises(ValueError, match="already has LoRA"):
        apply_lora(model, SETTINGS)
    with pytest.raises(ValueError, match="selects no target"):
        LoraSettings(encoder=False, mask_decoder=False).target_regex()


def test_only_adapters_and_head_change_after_a_step(lora_trained):
    before, model = lora_trained
    trained = (
        "detector.transformer.",
        "detector.dot_prod_scoring.",
        "detector.segmentation_head.",
        "detector.geometry_encoder.",
        "detector.backbone.language_backbone.resizer.",
    )
    changed = set()
    for name, p in model.named_parameters():
        if "lora_" not in name and not torch.equal(p, before[name.replace(".base_layer", "")]):
            assert name.startswith(trained) and ".base_layer." not in name, name
            changed.add(name.split(".")[1])
    assert changed == {"transformer", "dot_prod_scoring", "segmentation_head", "geometry_encoder", "backbone"}
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert sum(int(p.abs().sum() > 0) for p in lora_b) > len(lora_b) // 2  # B started at zero and moved
    groups = model.parameter_groups()
    assert groups["backbone"] == [] and groups["sam2_decoder"] == [] and groups["adapters"]


def test_adapter_export_is_small_and_reloads_onto_a_fresh_base(lora_trained, base, grounding_batch, tmp_path):
    _, model = lora_trained
    path = save_adapters(model, tmp_path / "adapters" / "lora.safetensors")
    with safe_open(str(path), framework="pt") as f:
        keys = list(f.keys())
        exported = sum(f.get_tensor(k).numel() for k in keys)
    total = sum(p.numel() for p in model.parameters())
    assert exported < 0.2 * total, (exported, total)
    assert not any(".trunk." in k and "lora_" not in k for k in keys)  # no frozen base weights
    assert not any("token_embedding" in k for k in keys)
    reloaded = load_adapters(base(), path).eval()
    assert has_lora(reloaded)
    a, b = outputs(model, grounding_batch), outputs(reloaded, grounding_batch)
    for key in ("pred_logits", "pred_boxes", "pred_masks", "presence_logit_dec"):
        assert torch.equal(a[key], b[key]), key


def test_adapter_file_errors(lora_trained, base, tmp_path):
    _, model = lora_trained
    with pytest.raises(CheckpointError, match="adapter file not found"):
        load_adapters(base(), tmp_path / "none.safetensors")
    path = save_adapters(model, tmp_path / "lora.safetensors")
    tiny_other_rank = base()
    apply_finetune_mode(tiny_other_rank, "lora", LoraSettings(rank=2, alpha=8.0, head=True))
    with pytest.raises(CheckpointError, match="shape mismatches"):
        load_adapters(tiny_other_rank, path)


def test_merged_model_matches_the_unmerged_one(lora_trained, base, grounding_batch):
    _, model = lora_trained
    unmerged = outputs(model, grounding_batch)
    merge_lora(model)
    assert not has_lora(model) and not hasattr(model, "peft_config")
    merged = outputs(model, grounding_batch)
    for key in ("pred_logits", "pred_boxes", "pred_masks", "presence_logit_dec"):
        assert torch.allclose(unmerged[key], merged[key], atol=1e-5), key
    plain = base()  # the merged state dict has the base model's keys
    plain.load_state_dict(model.state_dict(), strict=True)
    assert torch.equal(outputs(plain.eval(), grounding_batch)["pred_logits"], merged["pred_logits"])


def test_full_and_frozen_encoder_modes(base):
    model = base()
    apply_finetune_mode(model, "frozen_encoder")
    assert not any(p.requires_grad for p in model.vision.parameters())
    assert all(p.requires_grad for p in model.prompt_decoder.parameters())
    assert all(p.requires_grad for p in model.detector.transformer.parameters())
    assert model.text_encoder.frozen and model.text_encoder.resizer.weight.requires_grad
    apply_finetune_mode(model, "full")
    assert all(p.requires_grad for p in model.vision.parameters())
    assert model.text_encoder.frozen  # the text tower keeps its own setting
    with pytest.raises(ValueError, match="unknown fine-tuning mode 'partial'"):
        apply_finetune_mode(model, "partial")
    apply_finetune_mode(model, "lora", SETTINGS)
    with pytest.raises(ValueError, match="merge_lora"):
        apply_finetune_mode(model, "full")


def test_custom_target_regex_given_as_a_dict(base):
    settings = {"rank": 2, "alpha": 4.0, "dropout": 0.0, "target_modules": r".*trunk\.blocks\.0\.attn\.qkv"}
    model = apply_finetune_mode(base(), "lora", settings)
    adapted = [n for n, _ in model.named_modules() if n.endswith(".lora_A")]
    assert adapted == ["detector.backbone.vision_backbone.trunk.blocks.0.attn.qkv.lora_A"]
    assert model.lora_settings.rank == 2
