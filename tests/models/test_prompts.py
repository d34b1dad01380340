"""How captions reach the U-Net: clip skip, and captions longer than one CLIP window."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

from finetune.config.errors import ConfigError
from finetune.models.prompts import CaptionTokenizer, PromptEncoder, check_clip_skip

# 90 whole-word tokens, then a tail that only a reader of more than 75 tokens sees.
HEAD = " ".join(["red"] * 90)
TAILS = [HEAD + " blue star", HEAD + " green square"]


@pytest.fixture(scope="module")
def pipe(tiny_model: Path) -> StableDiffusionPipeline:
    return StableDiffusionPipeline.from_pretrained(tiny_model, safety_checker=None)


def encoded(encoder: PromptEncoder, captions: list[str]) -> torch.Tensor:
    with torch.no_grad():
        return encoder.encode(**encoder.tokenize(captions)).hidden


def test_clip_skip_2_reads_the_penultimate_layer_as_diffusers_does(pipe: StableDiffusionPipeline) -> None:
    prompts = ["a red circle", "a blue star on a green square"]
    skipped = encoded(PromptEncoder(pipe.text_encoder, pipe.tokenizer, clip_skip=2), prompts)
    last = encoded(PromptEncoder(pipe.text_encoder, pipe.tokenizer), prompts)
    # diffusers 0.42 finds the final norm at `text_encoder.text_model`, where transformers 4 had it;
    # transformers 5 keeps it on the model. Point that old path at it so diffusers' own code runs.
    if not hasattr(pipe.text_encoder, "text_model"):
        old_layout = SimpleNamespace(final_layer_norm=pipe.text_encoder.final_layer_norm)
        object.__setattr__(pipe.text_encoder, "text_model", old_layout)
    with torch.no_grad():
        # diffusers counts the layers skipped: its clip_skip=1 is the penultimate layer, kohya's and A1111's 2
        theirs_skipped, _ = pipe.encode_prompt(prompts, "cpu", 1, False, clip_skip=1)
        theirs_last, _ = pipe.encode_prompt(prompts, "cpu", 1, False)
    torch.testing.assert_close(skipped, theirs_skipped)
    torch.testing.assert_close(last, theirs_last)
    assert (skipped - last).abs().max() > 1e-2


def test_clip_skip_is_checked_against_the_model(pipe: StableDiffusionPipeline) -> None:
    with pytest.raises(ConfigError, match=r"model.clip_skip: 3 is more than the text encoder's 2 layers"):
        check_clip_skip(3, pipe.text_encoder, is_sdxl=False)
    with pytest.raises(ConfigError, match="model.clip_skip: SDXL"):
        check_clip_skip(2, pipe.text_encoder, is_sdxl=True)


def test_a_long_caption_is_read_in_75_token_windows(pipe: StableDiffusionPipeline) -> None:
    tokenizer = pipe.tokenizer
    long_ids = CaptionTokenizer(tokenizer, max_token_length=150)(TAILS)["input_ids"]
    standard = CaptionTokenizer(tokenizer)(TAILS)["input_ids"]
    assert long_ids.shape == (2, 2 * 77) and standard.shape == (2, 77)
    # The first window is the caption as one window reads it; the second: start, the rest, end, padding.
    assert torch.equal(long_ids[:, :77], standard)
    second = long_ids[0, 77:].tolist()
    body = tokenizer(TAILS[0], add_special_tokens=False).input_ids
    rest = body[75:]
    assert second[: len(rest) + 2] == [tokenizer.bos_token_id, *rest, tokenizer.eos_token_id]
    assert set(second[len(rest) + 2 :]) == {tokenizer.pad_token_id}


def test_tokens_past_77_change_the_conditioning_only_when_read(pipe: StableDiffusionPipeline) -> None:
    long = PromptEncoder(pipe.text_encoder, pipe.tokenizer, max_token_length=150)
    hidden = encoded(long, TAILS)
    assert hidden.shape == (2, 150 + 2, 32)
    assert (hidden[0] - hidden[1]).abs().max() > 1e-2
    one_window = encoded(PromptEncoder(pipe.text_encoder, pipe.tokenizer), TAILS)
    torch.testing.assert_close(one_window[0], one_window[1])  # the tails are cut
    # A short caption's first window (up to its last inner position) is what one window gives.
    short = ["a red circle"]
    torch.testing.assert_close(
        encoded(long, short)[:, :76], encoded(PromptEncoder(pipe.text_encoder, pipe.tokenizer), short)[:, :76]
    )


def test_sdxl_reads_long_captions_and_pools_the_first_window(tiny_sdxl_model: Path) -> None:
    sdxl = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_model)
    parts = (sdxl.text_encoder, sdxl.tokenizer, sdxl.text_encoder_2, sdxl.tokenizer_2)
    long, one = PromptEncoder(*parts, max_token_length=225), PromptEncoder(*parts)
    with torch.no_grad():
        wide = long.encode(**long.tokenize(TAILS))
        narrow = one.encode(**one.tokenize(TAILS))
    assert wide.hidden.shape[:2] == (2, 225 + 2)
    assert (wide.hidden[0] - wide.hidden[1]).abs().max() > 1e-2
    torch.testing.assert_close(wide.pooled, narrow.pooled)
