"""open_clip text towers behind the text-encoder contract of sam3's ``VETextEncoder``.

sam3's ``SAM3VLBackbone`` calls ``text_encoder(phrases, input_boxes, device=...)`` and expects
``(pad_mask (P, L) bool with True = padding, features (L, P, d_model), token_embeddings (L, P, width))``.
``OpenClipTextEncoder`` returns exactly that from any built-in open_clip text transformer, so the
grounding head cannot tell it from SAM3's own 350M-param encoder.

Weights never come from a hub at run time: ``pretrained`` is a local file or an open_clip tag whose
weights are already in the local cache; anything else is a clear error naming what is missing.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import open_clip
import torch
from huggingface_hub import try_to_load_from_cache
from open_clip.constants import HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME
from open_clip.model import CLIPTextCfg, _build_text_tower
from torch import Tensor, nn

from sambridge.models.checkpoint_io import CheckpointError, check_state_dict, read_weights

_UNUSED_TOWER_KEYS = ("text_projection", "attn_mask")
"""Text-tower entries of a CLIP file that the grounding head does not use (pooled projection, mask)."""

_CLIP_TEXT_KEYS = ("token_embedding.", "positional_embedding", "transformer.", "ln_final.", "text_projection")
"""Top-level text-tower key prefixes of an open_clip ``CLIP`` (non-custom-text) state dict."""


def _cached_open_clip_file(model_name: str, tag: str) -> Path:
    """Path of the locally cached weights of an open_clip (model, tag); never downloads."""
    cfg = open_clip.get_pretrained_cfg(model_name, tag)
    if not cfg:
        known = open_clip.list_pretrained_tags_by_model(model_name)
        raise ValueError(f"open_clip has no pretrained tag {tag!r} for {model_name!r}; known tags: {known}")
    looked = []
    if cfg.get("hf_hub"):
        repo_id, filename = os.path.split(cfg["hf_hub"])  # "org/repo/" means the default file name
        filename = filename or HF_WEIGHTS_NAME
        candidates = [filename]
        if filename == HF_WEIGHTS_NAME:
            candidates.insert(0, HF_SAFE_WEIGHTS_NAME)
        for name in candidates:
            found = try_to_load_from_cache(repo_id, name)
            if isinstance(found, str):
                return Path(found)
            looked.append(f"hf cache {repo_id}/{name}")
    if cfg.get("url"):
        path = Path.home() / ".cache" / "clip" / os.path.basename(cfg["url"])
        if path.is_file():
            return path
        looked.append(str(path))
    raise CheckpointError(
        f"open_clip weights {model_name}/{tag} are not in the local cache (looked in: {'; '.join(looked)}). "
        f"sambridge never downloads at run time: fetch them once where there is network access "
        f"(open_clip.create_model({model_name!r}, pretrained={tag!r})) or pass a local weight file."
    )


def _looks_like_a_path(pretrained: str | os.PathLike) -> bool:
    path = Path(pretrained)
    return bool(path.suffix) or os.sep in str(pretrained) or path.exists()


def _text_tower_state(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """The text-tower entries of an open_clip/CLIP state dict, without their ``text.`` prefix."""
    if isinstance(state_dict.get("state_dict"), dict):
        state_dict = state_dict["state_dict"]
    state_dict = {k.removeprefix("module."): v for k, v in state_dict.items()}
    if any(k.startswith("text.") for k in state_dict):  # CustomTextCLIP layout
        tower = {k[len("text.") :]: v for k, v in state_dict.items() if k.startswith("text.")}
    else:  # CLIP layout: text tower at top level next to `visual.*`
        tower = {k: v for k, v in state_dict.items() if k.startswith(_CLIP_TEXT_KEYS)}
    return {k: v for k, v in tower.items() if not k.startswith(_UNUSED_TOWER_KEYS)}


class OpenClipTextEncoder(nn.Module):
    """open_clip text transformer + a linear resizer to the grounding head's width.

    Args:
        d_model: Output width (the grounding head's ``d_model``).
        model_name: A built-in open_clip model name whose text tower (and BPE tokenizer) is used,
            e.g. ``"MobileCLIP-S1"`` or ``"ViT-S-32"``.
        pretrained: ``None`` (random init), an open_clip pretrained tag already in the local cache
            (e.g. ``"datacompdr"``), or a path to a local open_clip/CLIP weight file (``.pt``, ``.bin``
            or ``.safetensors``). Only the text-tower keys are loaded, strictly.
        context_length: Tokens per phrase (SAM3 uses 32); longer positional tables are truncated.
        text_cfg: Overrides of the open_clip ``text_cfg`` (e.g. ``{"width": 64, "layers": 1}`` for tests).
        frozen: Keep the transformer's weights fixed (the resizer always trains).
        vocabulary: Phrases whose frozen tower outputs are computed once and reused (a fixed label
            set); other phrases are encoded on the fly. Ignored while the tower is trainable.
    """

    def __init__(
        self,
        d_model: int,
        model_name: str = "MobileCLIP-S1",
        pretrained: str | os.PathLike | None = None,
        context_length: int = 32,
        text_cfg: dict | None = None,
        frozen: bool = True,
        vocabulary: Sequence[str] | None = None,
    ) -> None:
        super().__init__()
        model_cfg = open_clip.get_model_config(model_name)
        if model_cfg is None:
            raise ValueError(f"unknown open_clip model {model_name!r}; see open_clip.list_models()")
        cfg = dict(model_cfg["text_cfg"])
        if cfg.get("hf_model_name") or cfg.get("hf_tokenizer_name"):
            raise ValueError(
                f"{model_name!r} uses a Hugging Face text model/tokenizer; choose an open_clip "
                "model with the built-in BPE text transformer (e.g. MobileCLIP-S1, ViT-S-32)"
            )
        cfg.update(text_cfg or {})
        cfg.update(context_length=context_length, output_tokens=True, proj_type="none")
        self._cache: dict[str, tuple[Tensor, Tensor, Tensor]] = {}  # phrase -> frozen tower outputs
        weights_file = None
        quick_gelu = bool(model_cfg.get("quick_gelu", False))
        if pretrained is not None and not _looks_like_a_path(pretrained):  # an open_clip tag
            quick_gelu |= bool(open_clip.get_pretrained_cfg(model_name, str(pretrained)).get("quick_gelu"))
            weights_file = _cached_open_clip_file(model_name, str(pretrained))
        elif pretrained is not None:
            weights_file = Path(pretrained)
        self.model_name = model_name
        self.context_length = context_length
        self.tower = _build_text_tower(
            embed_dim=cfg["width"], text_cfg=CLIPTextCfg(**cfg), quick_gelu=quick_gelu
        )
        self.tokenizer = open_clip.get_tokenizer(model_name, context_length=context_length)
        self.pad_id = self.tower.pad_id
        self.resizer = nn.Linear(self.tower.width, d_model)
        if weights_file is not None:
            self.load_tower_weights(weights_file)
        self.vocabulary = tuple(dict.fromkeys(vocabulary or ()))
        self.register_load_state_dict_post_hook(lambda module, _: module._cache.clear())
        self.set_frozen(frozen)

    @property
    def frozen(self) -> bool:
        return not any(p.requires_grad for p in self.tower.parameters())

    def set_frozen(self, frozen: bool) -> None:
        """Freeze (eval mode, no grads) or unfreeze the transformer; the resizer stays trainable."""
        self.tower.requires_grad_(not frozen)
        self.tower.train(self.training and not frozen)
        self._cache.clear()

    def train(self, mode: bool = True) -> OpenClipTextEncoder:
        super().train(mode)
        if self.frozen:
            self.tower.eval()
        return self

    def _apply(self, fn, recurse: bool = True):  # .to(device) / .half(): cached outputs are stale
        self._cache.clear()
        return super()._apply(fn, recurse)

    def load_tower_weights(self, path: str | os.PathLike) -> None:
        """Load the text-tower part of an open_clip/CLIP weight file (strict on the tower's keys)."""
        state = _text_tower_state(read_weights(path, "open_clip weight file"))
        table = state.get("positional_embedding")
        if table is not None and table.shape[0] > self.context_length:
            state["positional_embedding"] = table[
                : self.context_length
            ]  # positions 0..L-1 keep their meaning
        check_state_dict(self.tower.state_dict(), state, f"text tower of {path}")
        self.tower.load_state_dict(state, strict=True)
        self._cache.clear()

    def _encode(self, phrases: Sequence[str], device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
        """Tower outputs, batch-first: pad mask (P, L), tokens (P, L, W), token embeddings (P, L, W)."""
        tokens = self.tokenizer(list(phrases), context_length=self.context_length).to(device)
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.frozen):
            embeds = self.tower.token_embedding(tokens)
            _, features = self.tower(tokens)
        return tokens == self.pad_id, features, embeds

    def _encode_with_cache(
        self, phrases: Sequence[str], device: torch.device
    ) -> tuple[Tensor, Tensor, Tensor]:
        if not self._cache and self.vocabulary:
            with torch.no_grad():
                outputs = self._encode(self.vocabulary, device)
            for i, phrase in enumerate(self.vocabulary):
                self._cache[phrase] = tuple(t[i] for t in outputs)
        todo = [p for p in dict.fromkeys(phrases) if p not in self._cache]
        fresh = {}
        if todo:
            outputs = self._encode(todo, device)
            fresh = {p: tuple(t[i] for t in outputs) for i, p in enumerate(todo)}
        rows = [self._cache[p] if p in self._cache else fresh[p] for p in phrases]
        return tuple(torch.stack([r[j] for r in rows]).to(device) for j in range(3))

    def forward(
        self, text: Sequence[str], input_boxes: Tensor | None = None, device: torch.device | str | None = None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Encode phrases with ``VETextEncoder.forward``'s contract (see the module docstring)."""
        if isinstance(text, str) or not all(isinstance(t, str) for t in text):
            raise TypeError(f"text must be a list of phrases (str), got {type(text).__name__}")
        if input_boxes is not None and len(input_boxes):
            raise ValueError("OpenClipTextEncoder does not support box placeholders in phrases")
        device = torch.device(device) if device is not None else self.resizer.weight.device
        if self.frozen and self.vocabulary:
            pad_mask, features, embeds = self._encode_with_cache(text, device)
        else:
            pad_mask, features, embeds = self._encode(text, device)
        return pad_mask, self.resizer(features.transpose(0, 1)), embeds.transpose(0, 1)
