"""The single-file export at full size: SD 1.5 and SD 2.1 architectures, random weights.

The tiny model (tests/export/test_single_file.py) cannot show that a file has SD's real layout: 12 input
blocks, upsamplers after attention, a 4-level VAE, OpenCLIP-H's 23 fused-q/k/v layers. Here each
architecture is built once in float16 (scripts/bench_models.py), written with `save_single_file`,
and read back by diffusers' own `StableDiffusionPipeline.from_single_file`, offline, with `config=`
a folder of configs only (no weights), so every weight comes from the file.
"""

from __future__ import annotations

import gc
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from diffusers import StableDiffusionPipeline
from diffusers.loaders.single_file_utils import infer_diffusers_model_type
from safetensors import safe_open

from finetune.export.single_file import save_single_file

pytestmark = pytest.mark.slow

# Our name -> the model type diffusers (and so the hub config it would fetch online) infers from the file.
DIFFUSERS_TYPE = {"sd15": "v1", "sd21": "v2"}
MODELS = ("unet", "vae", "text_encoder")


@dataclass
class RoundTrip:
    name: str
    source: Any  # StableDiffusionPipeline, or None once torn down
    loaded: Any
    path: Path


def write_configs(pipe: StableDiffusionPipeline, folder: Path) -> Path:
    """The pipeline's configs and tokenizer without weights: all `from_single_file(config=...)` reads."""
    pipe.save_config(folder)  # model_index.json
    for name in ("unet", "vae", "scheduler"):
        getattr(pipe, name).save_config(folder / name)
    pipe.text_encoder.config.save_pretrained(folder / "text_encoder")
    pipe.tokenizer.save_pretrained(folder / "tokenizer")
    return folder


@pytest.fixture(scope="module", params=sorted(DIFFUSERS_TYPE))
def round_trip(request, bench_models, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RoundTrip]:
    """One architecture exported and loaded back; pytest ends it before building the next (memory)."""
    name = request.param
    folder = tmp_path_factory.mktemp(name)
    path = folder / f"{name}.safetensors"
    trip = RoundTrip(name, bench_models.random_pipeline(name, torch.float16, seed=0), None, path)
    try:
        config = write_configs(trip.source, folder / "config")
        save_single_file(trip.source, path)
        trip.loaded = StableDiffusionPipeline.from_single_file(
            str(path),
            config=str(config),
            torch_dtype=torch.float16,
            local_files_only=True,
            safety_checker=None,
            requires_safety_checker=False,
        )
        yield trip
    finally:  # a GB-sized file, and a few GB of models: gone before the next architecture
        path.unlink(missing_ok=True)
        trip.source = trip.loaded = None
        gc.collect()


def file_shapes(path: Path) -> dict[str, list[int]]:
    with safe_open(path, "pt") as handle:
        return {key: handle.get_slice(key).get_shape() for key in handle.keys()}


def test_file_is_recognised_as_its_architecture(round_trip: RoundTrip) -> None:
    shapes = file_shapes(round_trip.path)
    # diffusers' checks on key names and shapes (which hub config it would pick without config=).
    meta = {key: torch.empty(shape, device="meta") for key, shape in shapes.items()}
    assert infer_diffusers_model_type(meta) == DIFFUSERS_TYPE[round_trip.name]
    unet = "model.diffusion_model."
    # SD's fixed block list: 12 input steps (3 of them downsamplers), upsamplers closing output
    # steps 2 (no attention there), 5 and 8 (after the attention).
    assert shapes[f"{unet}input_blocks.11.0.in_layers.2.weight"] == [1280, 1280, 3, 3]
    assert not any(key.startswith(f"{unet}input_blocks.12.") for key in shapes)
    for down in (3, 6, 9):
        assert f"{unet}input_blocks.{down}.0.op.weight" in shapes
    assert {f"{unet}output_blocks.2.1.conv.weight", f"{unet}output_blocks.5.2.conv.weight"} <= shapes.keys()
    assert f"{unet}output_blocks.8.2.conv.weight" in shapes
    assert shapes[f"{unet}out.2.weight"] == [4, 320, 3, 3]
    # Linear transformer projections (SD 2.x) are 2-d, convolutions (SD 1.x) 4-d: how tools tell them apart.
    linear = round_trip.name == "sd21"
    assert shapes[f"{unet}input_blocks.1.1.proj_in.weight"] == ([320, 320] if linear else [320, 320, 1, 1])
    vae = "first_stage_model."
    assert shapes[f"{vae}encoder.mid.attn_1.q.weight"] == [512, 512, 1, 1]
    assert {
        f"{vae}decoder.up.3.upsample.conv.weight",
        f"{vae}decoder.up.0.block.2.conv1.weight",
    } <= shapes.keys()
    assert not any(
        key.startswith((f"{vae}decoder.up.0.upsample", f"{vae}encoder.down.3.down")) for key in shapes
    )


def test_text_encoder_has_the_original_layout(round_trip: RoundTrip) -> None:
    shapes = file_shapes(round_trip.path)
    if round_trip.name == "sd15":
        prefix = "cond_stage_model.transformer.text_model."
        assert shapes[f"{prefix}encoder.layers.11.self_attn.q_proj.weight"] == [768, 768]
        assert shapes[f"{prefix}embeddings.token_embedding.weight"] == [49408, 768]
        return
    prefix = "cond_stage_model.model."
    assert not any(key.startswith("cond_stage_model.transformer.") for key in shapes)
    assert shapes[f"{prefix}token_embedding.weight"] == [49408, 1024]
    assert shapes[f"{prefix}positional_embedding"] == [77, 1024]
    # OpenCLIP-H has 24 blocks; SD 2 uses the penultimate layer's output, so diffusers keeps (and
    # `from_single_file` reads) 23 of them, and ignores a 24th (`resblocks.23`) when a file has one.
    blocks = {key.split(".")[4] for key in shapes if key.startswith(f"{prefix}transformer.resblocks.")}
    assert blocks == {str(i) for i in range(23)}
    assert shapes[f"{prefix}transformer.resblocks.22.attn.in_proj_weight"] == [3072, 1024]
    assert shapes[f"{prefix}transformer.resblocks.22.mlp.c_fc.weight"] == [4096, 1024]


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-for-bit equal (compared as integers: several times faster than float16 `torch.equal`)."""
    if a.shape != b.shape:
        return False
    if a.is_floating_point() and a.element_size() == 2:
        return torch.equal(a.view(torch.int16), b.view(torch.int16))
    return torch.equal(a, b)


def test_weights_come_back_bit_for_bit(round_trip: RoundTrip) -> None:
    for name in MODELS:
        want = getattr(round_trip.source, name).state_dict()
        got = getattr(round_trip.loaded, name).state_dict()
        assert got.keys() == want.keys(), name
        for key, value in want.items():
            assert got[key].dtype == value.dtype and same_bits(got[key], value), f"{name}: {key}"


def model_outputs(pipe: StableDiffusionPipeline) -> dict[str, torch.Tensor]:
    """Each model on fixed inputs, kept small (16 tokens, 8x8 latents, 32-px images) for a CPU.

    The text encoder and U-Net run in float16 (mostly matrix products: slower than float32 on a CPU,
    but cheaper than a float32 copy of them); the VAE, mostly convolutions, which are very slow in
    float16 on a CPU, runs in float32: float16 -> float32 -> float16 is exact, so it is put back as it was.
    """
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, pipe.text_encoder.config.vocab_size, (1, 16), generator=generator)
    states = torch.randn(1, 77, pipe.unet.config.cross_attention_dim, generator=generator)
    latents = torch.randn(1, 4, 8, 8, generator=generator)
    pixels = torch.rand(1, 3, 32, 32, generator=generator) * 2 - 1
    half = torch.float16
    with torch.no_grad():
        text = pipe.text_encoder(ids)
        noise = pipe.unet(latents.to(half), torch.tensor([500]), encoder_hidden_states=states.to(half))
        pipe.vae.to(torch.float32)
        try:
            encoded = pipe.vae.encode(pixels).latent_dist.mean
            decoded = pipe.vae.decode(latents[..., :4, :4]).sample
        finally:
            pipe.vae.to(half)
    return {
        "text": text.last_hidden_state,
        "pooled": text.pooler_output,
        "unet": noise.sample,
        "encoded": encoded,
        "decoded": decoded,
    }


def test_models_give_the_same_outputs(round_trip: RoundTrip) -> None:
    want, got = model_outputs(round_trip.source), model_outputs(round_trip.loaded)
    for key, value in want.items():
        assert torch.isfinite(value).all(), key  # NaNs would compare unequal and say nothing
        torch.testing.assert_close(got[key], value, msg=key)  # the dtype's default tolerance
