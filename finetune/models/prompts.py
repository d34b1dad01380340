"""Captions → the U-Net's text conditioning: one CLIP text encoder (SD 1.x / 2.x) or two (SDXL).

SDXL conditions its U-Net on both encoders' penultimate hidden states side by side, and adds the
second encoder's pooled, projected output and six numbers about the image (original size, crop
top-left, target size) to its time embedding, as Stability's and diffusers' SDXL training do.

Captions longer than the encoder's window (75 tokens between the start and end markers) are read the
way kohya sd-scripts and A1111 read them when `data.max_token_length` allows it: cut into 75-token
chunks, each chunk encoded on its own between its own markers, and the chunks' hidden states joined
(one start marker, every chunk's tokens, one end marker). SDXL's pooled output is the first chunk's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from finetune.config.errors import ConfigError


@dataclass(frozen=True)
class CaptionTokenizer:
    """Captions to token ids for the model's text encoders: `input_ids`, and `input_ids_2` from SDXL's
    second tokenizer. Small and picklable: data workers tokenize with it."""

    tokenizer: Any
    tokenizer_2: Any = None
    # Tokens a caption may have between its markers (a multiple of the window's 75); null: one window.
    max_token_length: int | None = None

    @classmethod
    def of(cls, tokenizer: Any) -> CaptionTokenizer:
        """`tokenizer` as a CaptionTokenizer (a single Hugging Face tokenizer is wrapped)."""
        return tokenizer if isinstance(tokenizer, CaptionTokenizer) else cls(tokenizer)

    @property
    def model_max_length(self) -> int:
        """The encoder's window: 77 ids for CLIP, markers included."""
        return self.tokenizer.model_max_length

    @property
    def chunks(self) -> int:
        """How many windows a caption is read in."""
        body = self.model_max_length - 2
        return max(1, math.ceil((self.max_token_length or body) / body))

    @property
    def token_limit(self) -> int:
        """Ids a caption may have, its markers included; longer captions are cut."""
        return self.chunks * (self.model_max_length - 2) + 2

    @property
    def length(self) -> int:
        """Ids per caption in a batch: `chunks` windows of `model_max_length`."""
        return self.chunks * self.model_max_length

    def __call__(self, captions: list[str]) -> dict[str, torch.Tensor]:
        """[B, length] int64 ids per tokenizer, padded and truncated as its encoder expects."""
        ids = {"input_ids": token_ids(self.tokenizer, captions, self.chunks)}
        if self.tokenizer_2 is not None:
            ids["input_ids_2"] = token_ids(self.tokenizer_2, captions, self.chunks)
        return ids

    def one(self, caption: str) -> dict[str, torch.Tensor]:
        """The ids of one caption: [L] per tokenizer."""
        return {name: ids[0] for name, ids in self([caption]).items()}


def token_ids(tokenizer: Any, captions: list[str], chunks: int = 1) -> torch.Tensor:
    """[B, chunks * window] ids: each window is start marker, up to window - 2 of the caption's tokens,
    end marker, padding. With one window this is what the pipelines' own tokenizing gives."""
    window = tokenizer.model_max_length
    if chunks == 1:
        tokens = tokenizer(
            captions, padding="max_length", max_length=window, truncation=True, return_tensors="pt"
        )
        return tokens.input_ids.long()
    body = window - 2
    bodies = tokenizer(
        captions, add_special_tokens=False, max_length=chunks * body, truncation=True
    ).input_ids
    rows = []
    for tokens in bodies:
        row: list[int] = []
        for start in range(0, chunks * body, body):
            chunk = [tokenizer.bos_token_id, *tokens[start : start + body], tokenizer.eos_token_id]
            row += chunk + [tokenizer.pad_token_id] * (window - len(chunk))
        rows.append(row)
    return torch.tensor(rows, dtype=torch.long)


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
    # kohya's and A1111's count: 1 is the last layer's output, 2 the penultimate layer's (SD 1.x / 2.x)
    clip_skip: int = 1
    max_token_length: int | None = None  # see CaptionTokenizer

    @property
    def is_sdxl(self) -> bool:
        return self.text_encoder_2 is not None

    @property
    def models(self) -> list[torch.nn.Module]:
        return [m for m in (self.text_encoder, self.text_encoder_2) if m is not None]

    @property
    def captions(self) -> CaptionTokenizer:
        return CaptionTokenizer(self.tokenizer, self.tokenizer_2, self.max_token_length)

    @property
    def is_standard(self) -> bool:
        """Whether a pipeline's own prompt encoding gives the same conditioning as `encode`."""
        return self.clip_skip == 1 and self.captions.chunks == 1

    def tokenize(self, captions: list[str]) -> dict[str, torch.Tensor]:
        """Token ids for each encoder: `input_ids` ([B, L]), and `input_ids_2` for SDXL."""
        return self.captions(captions)

    def encode(self, input_ids: torch.Tensor, input_ids_2: torch.Tensor | None = None) -> TextConditioning:
        chunks = input_ids.shape[-1] // self.tokenizer.model_max_length
        if not self.is_sdxl:
            hidden = _hidden_states(self.text_encoder, _windows(input_ids, chunks), self.clip_skip)
            return TextConditioning(_joined(hidden, chunks))
        first = self.text_encoder(_windows(input_ids, chunks), output_hidden_states=True)
        second = self.text_encoder_2(_windows(input_ids_2, chunks), output_hidden_states=True)
        hidden = torch.cat([first.hidden_states[-2], second.hidden_states[-2]], dim=-1)
        pooled = second.text_embeds.unflatten(0, (-1, chunks))[:, 0]
        return TextConditioning(_joined(hidden, chunks), pooled=pooled)

    def identity(self, model_identity: Any) -> str:
        """One cache identity for all the encoders and how they are read (a cached text feature depends
        on each)."""
        models = "+".join(model_identity(model) for model in self.models)
        return models if self.clip_skip == 1 else f"{models}/clip_skip={self.clip_skip}"


def check_clip_skip(clip_skip: int, text_encoder: Any, is_sdxl: bool) -> None:
    """`model.clip_skip` must name a layer the text encoder has; SDXL reads its fixed layer already (its
    text encoder need not be given, then)."""
    if clip_skip == 1:
        return
    if is_sdxl:
        raise ConfigError(
            "model.clip_skip: SDXL already conditions on its encoders' penultimate layers; "
            "clip_skip is for SD 1.x / 2.x models — leave it at 1"
        )
    layers = text_encoder.config.num_hidden_layers
    if clip_skip > layers:
        raise ConfigError(f"model.clip_skip: {clip_skip} is more than the text encoder's {layers} layers")


def _windows(ids: torch.Tensor, chunks: int) -> torch.Tensor:
    """[B, chunks * W] ids → [B * chunks, W]: every window encoded as its own caption."""
    return ids.reshape(ids.shape[0] * chunks, -1)


def _joined(hidden: torch.Tensor, chunks: int) -> torch.Tensor:
    """[B * chunks, W, D] → [B, chunks * (W - 2) + 2, D]: the first start marker, each window's inner
    positions, the last end marker."""
    if chunks == 1:
        return hidden
    windows = hidden.unflatten(0, (-1, chunks))
    inner = windows[:, :, 1:-1].flatten(1, 2)
    return torch.cat([windows[:, 0, :1], inner, windows[:, -1, -1:]], dim=1)


def _hidden_states(text_encoder: Any, ids: torch.Tensor, clip_skip: int) -> torch.Tensor:
    """The encoder's last hidden states, or with `clip_skip` = n those of its n-th layer from the end,
    through the final layer norm as the last ones are (what A1111 and diffusers do)."""
    if clip_skip == 1:
        return text_encoder(ids, return_dict=False)[0]
    states = text_encoder(ids, output_hidden_states=True).hidden_states
    # transformers 5 keeps the norm on the model itself; older versions on its `text_model`.
    text_model = getattr(text_encoder, "text_model", text_encoder)
    return text_model.final_layer_norm(states[-clip_skip])


def pipeline_prompt_encoder(
    pipe: Any, clip_skip: int = 1, max_token_length: int | None = None
) -> PromptEncoder:
    """A diffusers SD or SDXL pipeline's text side, read at `clip_skip` (checked against its encoder)
    and `max_token_length`."""
    text_encoder_2 = getattr(pipe, "text_encoder_2", None)
    check_clip_skip(clip_skip, pipe.text_encoder, text_encoder_2 is not None)
    return PromptEncoder(
        pipe.text_encoder,
        pipe.tokenizer,
        text_encoder_2,
        getattr(pipe, "tokenizer_2", None),
        clip_skip=clip_skip,
        max_token_length=max_token_length,
    )


def pipeline_text_inputs(
    prompts: PromptEncoder, texts: list[str], negative: list[str] | None, pipe: Any = None
) -> dict[str, Any]:
    """`pipe`'s text arguments for `texts`: the strings where its own encoding matches training's, else
    embeddings from `prompts` (clip skip, long captions); a missing negative prompt is zeros where the
    pipeline says so (SDXL's `force_zeros_for_empty_prompt`)."""
    zeros_for_empty = pipe is not None and bool(pipe.config.get("force_zeros_for_empty_prompt", False))
    if prompts.is_standard:
        return {"prompt": texts, "negative_prompt": negative}
    device = prompts.text_encoder.device
    with torch.no_grad():
        positive = prompts.encode(**_on(prompts.tokenize(texts), device))
        if negative is None and zeros_for_empty:
            unconditioned = TextConditioning(
                torch.zeros_like(positive.hidden),
                None if positive.pooled is None else torch.zeros_like(positive.pooled),
            )
        else:
            blank = negative if negative is not None else [""] * len(texts)
            unconditioned = prompts.encode(**_on(prompts.tokenize(blank), device))
    inputs = {"prompt_embeds": positive.hidden, "negative_prompt_embeds": unconditioned.hidden}
    if positive.pooled is not None:
        inputs["pooled_prompt_embeds"] = positive.pooled
        inputs["negative_pooled_prompt_embeds"] = unconditioned.pooled
    return inputs


def _on(ids: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {name: value.to(device) for name, value in ids.items()}


def size_conditioning(
    original_size: torch.Tensor, crop_top_left: torch.Tensor, target_size: tuple[int, int], dtype: torch.dtype
) -> torch.Tensor:
    """SDXL's six numbers per image: original (h, w), crop top-left (top, left), target (h, w)."""
    target = torch.tensor(target_size, device=original_size.device).expand(original_size.shape[0], 2)
    return torch.cat([original_size, crop_top_left, target], dim=1).to(dtype)
