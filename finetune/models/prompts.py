"""Captions → the U-Net's text conditioning: one CLIP text encoder (SD 1.x / 2.x) or two (SDXL).

SDXL conditions its U-Net on both encoders' penultimate hidden states side by side, and adds the
second encoder's pooled, projected output and six numbers about the image (original size, crop
top-left, target size) to its time embedding, as Stability's and diffusers' SDXL training do.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class CaptionTokenizer:
    """Captions to token ids for the model's text encoders: `input_ids`, and `input_ids_2` from SDXL's
    second tokenizer. Small and picklable: data workers tokenize with it."""

    tokenizer: Any
    tokenizer_2: Any = None

    @classmethod
    def of(cls, tokenizer: Any) -> CaptionTokenizer:
        """`tokenizer` as a CaptionTokenizer (a single Hugging Face tokenizer is wrapped)."""
        return tokenizer if isinstance(tokenizer, CaptionTokenizer) else cls(tokenizer)

    @property
    def model_max_length(self) -> int:
        return self.tokenizer.model_max_length

    def __call__(self, captions: list[str]) -> dict[str, torch.Tensor]:
        """[B, model_max_length] int64 ids per tokenizer, padded and truncated as its encoder expects."""
        ids = {"input_ids": _token_ids(self.tokenizer, captions)}
        if self.tokenizer_2 is not None:
            ids["input_ids_2"] = _token_ids(self.tokenizer_2, captions)
        return ids

    def one(self, caption: str) -> dict[str, torch.Tensor]:
        """The ids of one caption: [L] per tokenizer."""
        return {name: ids[0] for name, ids in self([caption]).items()}


def _token_ids(tokenizer: Any, captions: list[str]) -> torch.Tensor:
    tokens = tokenizer(
        captions,
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    )
    return tokens.input_ids.long()


@dataclass
class TextConditioning:
    """What the U-Net is conditioned on besides the noisy latents and the timestep."""

    hidden: torch.Tensor  # cross-attention context, [B, L, D]
    pooled: torch.Tensor | None = None  # SDXL: text encoder 2's projected pooled output, [B, P]
    added: dict[str, torch.Tensor] | None = None  # SDXL: the U-Net's `added_cond_kwargs`


@dataclass
class PromptEncoder:
    """The model's text side, with what tokenizes and encodes a caption for it."""

    text_encoder: Any
    tokenizer: Any
    text_encoder_2: Any = None  # SDXL only
    tokenizer_2: Any = None

    @property
    def is_sdxl(self) -> bool:
        return self.text_encoder_2 is not None

    @property
    def models(self) -> list[torch.nn.Module]:
        return [m for m in (self.text_encoder, self.text_encoder_2) if m is not None]

    @property
    def captions(self) -> CaptionTokenizer:
        return CaptionTokenizer(self.tokenizer, self.tokenizer_2)

    def tokenize(self, captions: list[str]) -> dict[str, torch.Tensor]:
        """Token ids for each encoder: `input_ids` ([B, L]), and `input_ids_2` for SDXL."""
        return self.captions(captions)

    def encode(self, input_ids: torch.Tensor, input_ids_2: torch.Tensor | None = None) -> TextConditioning:
        if not self.is_sdxl:
            return TextConditioning(self.text_encoder(input_ids, return_dict=False)[0])
        first = self.text_encoder(input_ids, output_hidden_states=True)
        second = self.text_encoder_2(input_ids_2, output_hidden_states=True)
        hidden = torch.cat([first.hidden_states[-2], second.hidden_states[-2]], dim=-1)
        return TextConditioning(hidden, pooled=second.text_embeds)

    def identity(self, model_identity: Any) -> str:
        """One cache identity for all the encoders (a cached text feature depends on each)."""
        return "+".join(model_identity(model) for model in self.models)


def size_conditioning(
    original_size: torch.Tensor, crop_top_left: torch.Tensor, target_size: tuple[int, int], dtype: torch.dtype
) -> torch.Tensor:
    """SDXL's six numbers per image: original (h, w), crop top-left (top, left), target (h, w)."""
    target = torch.tensor(target_size, device=original_size.device).expand(original_size.shape[0], 2)
    return torch.cat([original_size, crop_top_left, target], dim=1).to(dtype)
