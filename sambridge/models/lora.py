"""Fine-tuning modes for ``GroundedSAM2`` and LoRA through peft.

Modes (``apply_finetune_mode``); an open_clip text tower keeps its own frozen/trainable setting
in all of them (SAM3's own text encoder, in SAM3 teachers, follows the mode like every other part)
and the text encoder's output projection (``resizer``) always trains:

* ``full``: everything trains.
* ``frozen_encoder``: SAM2's Hiera trunk and both FPN necks are frozen; head and SAM2 decoder train.
* ``lora``: trunk, necks and SAM2's prompt encoder/mask decoder are frozen; LoRA adapters (peft,
  regex ``target_modules``) on the Hiera attention (qkv, proj), the SAM2 mask decoder's attention
  projections and optionally the grounding head's attention train, together with the grounding
  head itself (except the base weights of LoRA-adapted layers).

``save_adapters`` writes what LoRA training changed (adapters + the trained head, a small
safetensors file) and ``load_adapters`` puts it back onto a freshly built base model;
``merge_lora`` folds the adapters into the base weights and returns a plain model.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model, set_peft_model_state_dict
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors import safe_open
from safetensors.torch import save as safetensors_bytes
from torch import nn

from data_pipelines.atomic import atomic_write
from sambridge.models.checkpoint_io import CheckpointError, check_state_dict
from sambridge.models.grounded_sam2 import ADAPTER_MARKER, GroundedSAM2
from sambridge.models.grounding_head import HEAD_MODULES
from sambridge.models.text_encoder import OpenClipTextEncoder

FinetuneMode = Literal["full", "frozen_encoder", "lora"]

ADAPTER_FORMAT = "sambridge-lora-v1"

_ENCODER_TARGETS = r"detector\.backbone\.vision_backbone\.trunk\.blocks\.\d+\.attn\.(qkv|proj)"
_MASK_DECODER_TARGETS = (
    r"prompt_decoder\.mask_decoder\.transformer\.(layers\.\d+\.(self_attn|cross_attn_token_to_image"
    r"|cross_attn_image_to_token)|final_attn_token_to_image)\.(q_proj|k_proj|v_proj|out_proj)"
)
_HEAD_TARGETS = (
    r"detector\.(transformer|geometry_encoder)\..*\.(self_attn|cross_attn|cross_attn_image|ca_text)"
)
_BASE_LAYER = ".base_layer."


@dataclass(frozen=True)
class LoraSettings:
    """Where LoRA adapters go and how big they are.

    Attributes:
        rank: Adapter rank r.
        alpha: Scaling numerator (the update is scaled by alpha / r).
        dropout: Dropout on the adapter input.
        encoder: Adapt the Hiera trunk's attention (qkv, proj).
        mask_decoder: Adapt SAM2's mask-decoder attention projections (q, k, v, out).
        head: Adapt the grounding head's attention layers (fusion encoder, decoder, geometry encoder).
        target_modules: A custom regex of module names (full match) replacing the three switches.
    """

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    encoder: bool = True
    mask_decoder: bool = True
    head: bool = False
    target_modules: str | None = None

    def target_regex(self) -> str:
        if self.target_modules:
            return self.target_modules
        parts = [
            rx
            for on, rx in (
                (self.encoder, _ENCODER_TARGETS),
                (self.mask_decoder, _MASK_DECODER_TARGETS),
                (self.head, _HEAD_TARGETS),
            )
            if on
        ]
        if not parts:
            raise ValueError(
                "LoraSettings selects no target modules (encoder, mask_decoder and head all off)"
            )
        return "|".join(f"(?:{rx})" for rx in parts)


def has_lora(model: nn.Module) -> bool:
    return any(isinstance(m, BaseTunerLayer) for m in model.modules())


def apply_lora(model: GroundedSAM2, settings: LoraSettings = LoraSettings()) -> GroundedSAM2:
    """Inject peft LoRA adapters in place (no ``PeftModel`` wrapper: the model keeps its class and API).

    Afterwards only the adapters are trainable; ``apply_finetune_mode(model, "lora")`` then
    re-enables the head and the text resizer.
    """
    if has_lora(model):
        raise ValueError("model already has LoRA adapters")
    config = LoraConfig(
        r=settings.rank,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=settings.target_regex(),
        bias="none",
    )
    inject_adapter_in_model(config, model)
    model.lora_settings = settings
    return model


def apply_finetune_mode(
    model: GroundedSAM2, mode: FinetuneMode, lora: LoraSettings | dict | None = None
) -> GroundedSAM2:
    """Set ``requires_grad`` for a fine-tuning mode (and inject LoRA for ``"lora"``); returns the model.

    Args:
        model: The model (modified in place).
        mode: ``"full"``, ``"frozen_encoder"`` or ``"lora"``.
        lora: LoRA settings (or their fields as a dict) for ``"lora"``; ignored otherwise.
    """
    text = model.text_encoder
    own_setting = isinstance(text, OpenClipTextEncoder)
    text_frozen = text.frozen if own_setting else False
    if mode == "lora":
        if not has_lora(model):
            apply_lora(model, LoraSettings(**lora) if isinstance(lora, dict) else lora or LoraSettings())
        model.requires_grad_(False)
        for name, p in model.named_parameters():
            in_head = name.startswith(tuple(f"detector.{m}." for m in HEAD_MODULES))
            p.requires_grad_(ADAPTER_MARKER in name or (in_head and _BASE_LAYER not in name))
    elif mode in ("full", "frozen_encoder"):
        if has_lora(model):
            raise ValueError(f"mode {mode!r} on a model with LoRA adapters; merge_lora() it first")
        model.requires_grad_(True)
        if mode == "frozen_encoder":
            model.vision.requires_grad_(False)
    else:
        raise ValueError(f"unknown fine-tuning mode {mode!r}; choose full, frozen_encoder or lora")
    if own_setting:
        text.set_frozen(text_frozen)
    text.resizer.requires_grad_(True)
    return model


def adapter_state_dict(model: GroundedSAM2) -> dict:
    """LoRA weights (peft naming, no adapter name) plus every other trainable parameter (the head)."""
    if not has_lora(model):
        raise ValueError("model has no LoRA adapters")
    state = {k: v.detach() for k, v in get_peft_model_state_dict(model).items()}
    state.update(
        {n: p.detach() for n, p in model.named_parameters() if p.requires_grad and ADAPTER_MARKER not in n}
    )
    return state


def save_adapters(model: GroundedSAM2, path: str | os.PathLike) -> Path:
    """Write ``adapter_state_dict`` and the LoRA settings to a safetensors file (atomically)."""
    tensors = {k: v.contiguous().cpu() for k, v in adapter_state_dict(model).items()}
    metadata = {"format": ADAPTER_FORMAT, "lora_settings": json.dumps(asdict(model.lora_settings))}
    return atomic_write(path, safetensors_bytes(tensors, metadata=metadata))


def load_adapters(model: GroundedSAM2, path: str | os.PathLike) -> GroundedSAM2:
    """Load a ``save_adapters`` file onto a freshly built base model (in place; strict on every key)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"adapter file not found: {path}")
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata() or {}
        if metadata.get("format") != ADAPTER_FORMAT:
            raise CheckpointError(
                f"{path} is not a sambridge adapter file (format {metadata.get('format')!r})"
            )
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    apply_finetune_mode(model, "lora", LoraSettings(**json.loads(metadata["lora_settings"])))
    check_state_dict(adapter_state_dict(model), tensors, f"adapter file {path}")
    lora = {k: v for k, v in tensors.items() if ADAPTER_MARKER in k}
    set_peft_model_state_dict(model, lora)
    model.load_state_dict({k: v for k, v in tensors.items() if ADAPTER_MARKER not in k}, strict=False)
    return model


def merge_lora(model: GroundedSAM2) -> GroundedSAM2:
    """Fold every LoRA adapter into its base layer and remove peft's wrappers (in place).

    The result has the base model's module structure and state-dict keys (loadable into a
    freshly built model of the same variant).
    """
    tuner_names = [n for n, m in model.named_modules() if isinstance(m, BaseTunerLayer)]
    outermost = [n for n in tuner_names if not any(n.startswith(f"{o}.") for o in tuner_names if o != n)]
    for name in outermost:
        parent_name, _, child = name.rpartition(".")
        layer = model.get_submodule(name)
        if hasattr(layer, "unload_and_optionally_merge_module"):  # e.g. peft's MultiheadAttention
            plain = layer.unload_and_optionally_merge_module(merge=True, safe_merge=True, adapter_names=None)
        else:
            layer.merge(safe_merge=True)
            plain = layer.get_base_layer()
        setattr(model.get_submodule(parent_name) if parent_name else model, child, plain)
    for attribute in ("peft_config", "lora_settings"):
        if hasattr(model, attribute):
            delattr(model, attribute)
    return model
