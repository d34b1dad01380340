"""Single-file checkpoints: `export.single_file` writes the original SD layout, `models.loading` reads it.

The tiny model goes diffusers folder -> one .safetensors / .ckpt -> `from_single_file` (with the
folder as `model.single_file_config`, all offline) and must give the folder's outputs back.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from diffusers import DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from diffusers.loaders.single_file_utils import CHECKPOINT_KEY_NAMES
from peft import LoraConfig
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import CLIPTextModel

from finetune.config.errors import ConfigError, ExportExistsError
from finetune.config.schema import ModelConfig
from finetune.export.single_file import pipeline_to_ldm, save_single_file
from finetune.models.loading import Components, load_components, load_pipeline
from finetune.tiny.builder import build_tiny_pipeline

PROMPT = "a red circle"


@pytest.fixture(scope="module")
def reference(tiny_model: Path) -> Components:
    return load_components(ModelConfig(pretrained=str(tiny_model)))


@pytest.fixture(scope="module")
def single_file(reference: Components, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("single") / "tiny.safetensors"
    return save_single_file(reference, path, metadata={"modelspec.title": "tiny"})


@pytest.fixture(scope="module")
def sd2_like_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model with SD 2.x's differences (OpenCLIP-style text encoder, linear projections)
    and another block layout: two layers per block, an upsampler after cross-attention."""
    pipe = build_tiny_pipeline()
    text_config = pipe.text_encoder.config
    text_config.hidden_act = "gelu"
    torch.manual_seed(1)
    parts = dict(pipe.components, requires_safety_checker=False)
    parts["text_encoder"] = CLIPTextModel(text_config)
    parts["unet"] = UNet2DConditionModel.from_config(
        pipe.unet.config,
        use_linear_projection=True,
        layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D",) * 2,
        up_block_types=("CrossAttnUpBlock2D",) * 2,
    )
    directory = tmp_path_factory.mktemp("models") / "tiny-sd2"
    StableDiffusionPipeline(**parts).save_pretrained(directory)
    return directory


def outputs(parts: Components) -> dict[str, torch.Tensor]:
    """Text embeddings, VAE latents and reconstruction, and one U-Net prediction, from fixed inputs."""
    generator = torch.Generator().manual_seed(0)
    pixels = torch.rand(1, 3, 32, 32, generator=generator) * 2 - 1
    noisy = torch.randn(1, 4, 16, 16, generator=generator)
    ids = parts.tokenizer([PROMPT], padding="max_length", truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        text = parts.text_encoder(ids)[0]
        latents = parts.vae.encode(pixels).latent_dist.mean
        decoded = parts.vae.decode(latents).sample
        noise = parts.unet(noisy, torch.tensor([500]), encoder_hidden_states=text).sample
    return {"ids": ids, "text": text, "latents": latents, "decoded": decoded, "noise": noise}


def assert_same_models(got: Components, want: Components) -> None:
    for name in ("unet", "vae", "text_encoder"):
        ours, theirs = getattr(got, name).state_dict(), getattr(want, name).state_dict()
        assert ours.keys() == theirs.keys(), name
        for key, value in theirs.items():
            torch.testing.assert_close(ours[key], value, rtol=0, atol=0, msg=f"{name}: {key}")
    got_out, want_out = outputs(got), outputs(want)
    for key, value in want_out.items():
        torch.testing.assert_close(got_out[key], value, msg=key)


def test_file_is_in_the_original_layout(single_file: Path) -> None:
    with safe_open(single_file, "pt") as file:
        keys = set(file.keys())
        assert file.metadata() == {"format": "pt", "modelspec.title": "tiny"}
        # The original VAE attention uses 1x1 convolutions.
        assert file.get_slice("first_stage_model.encoder.mid.attn_1.q.weight").get_shape() == [64, 64, 1, 1]
    prefixes = ("model.diffusion_model.", "first_stage_model.", "cond_stage_model.transformer.text_model.")
    assert all(key.startswith(prefixes) for key in keys)
    # The keys diffusers (and A1111 / ComfyUI) probe to recognise an SD 1.x checkpoint's parts.
    assert CHECKPOINT_KEY_NAMES["clip"] in keys
    assert {
        "model.diffusion_model.input_blocks.0.0.weight",
        "first_stage_model.decoder.up.1.upsample.conv.weight",
    } <= keys
    assert (
        "model.diffusion_model.output_blocks.1.1.conv.weight" in keys
    )  # upsampler of a block without attention


def test_single_file_components_match_the_folder(
    tiny_model: Path, single_file: Path, reference: Components
) -> None:
    loaded = load_components(ModelConfig(pretrained=str(single_file), single_file_config=str(tiny_model)))
    assert_same_models(loaded, reference)
    assert isinstance(loaded.noise_scheduler, DDPMScheduler)
    for key in ("prediction_type", "beta_schedule", "beta_start", "beta_end", "num_train_timesteps"):
        assert loaded.noise_scheduler.config[key] == reference.noise_scheduler.config[key], key
    torch.testing.assert_close(loaded.noise_scheduler.betas, reference.noise_scheduler.betas, rtol=0, atol=0)
    assert not any(p.requires_grad for p in loaded.unet.parameters())


def test_ckpt_loads_the_same(
    tiny_model: Path, single_file: Path, reference: Components, tmp_path: Path
) -> None:
    ckpt = tmp_path / "tiny.ckpt"
    torch.save({"state_dict": load_file(single_file), "global_step": 7}, ckpt)
    loaded = load_components(ModelConfig(pretrained=str(ckpt), single_file_config=str(tiny_model)))
    assert_same_models(loaded, reference)


class _Payload:
    """Unpickling this runs os.mkdir: what a malicious .ckpt could do with any function."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (str(self.marker),)


def test_ckpt_with_python_objects_is_refused_unrun(
    tiny_model: Path, single_file: Path, tmp_path: Path
) -> None:
    ckpt, marker = tmp_path / "evil.ckpt", tmp_path / "ran"
    torch.save({"state_dict": load_file(single_file), "callbacks": _Payload(marker)}, ckpt)
    with pytest.raises(ConfigError, match=r"model\.pretrained: .*weights_only"):
        load_components(ModelConfig(pretrained=str(ckpt), single_file_config=str(tiny_model)))
    assert not marker.exists()


class _Note:
    """A plain Python object in a .ckpt: harmless, but weights_only loading refuses it."""


def test_a_ckpt_needing_full_unpickling_loads_only_when_allowed(
    tiny_model: Path, single_file: Path, reference: Components, tmp_path: Path
) -> None:
    ckpt = tmp_path / "trusted.ckpt"
    torch.save({"state_dict": load_file(single_file), "note": _Note()}, ckpt)
    cfg = ModelConfig(pretrained=str(ckpt), single_file_config=str(tiny_model))
    with pytest.raises(ConfigError, match="weights_only"):
        load_components(cfg)
    assert_same_models(load_components(cfg, allow_unsafe_pickle=True), reference)


def test_load_pipeline_generates_like_the_folder(tiny_model: Path, single_file: Path) -> None:
    def generate(pipe: StableDiffusionPipeline) -> torch.Tensor:
        generator = torch.Generator().manual_seed(0)
        kwargs = dict(num_inference_steps=2, height=32, width=32, output_type="pt", generator=generator)
        return pipe(PROMPT, **kwargs).images

    cfg = ModelConfig(pretrained=str(single_file), single_file_config=str(tiny_model))
    images = generate(load_pipeline(cfg))
    assert images.shape == (1, 3, 32, 32) and torch.isfinite(images).all()
    torch.testing.assert_close(images, generate(load_pipeline(ModelConfig(pretrained=str(tiny_model)))))


def test_sd2_text_encoder_uses_open_clip_layout(sd2_like_model: Path, tmp_path: Path) -> None:
    want = load_components(ModelConfig(pretrained=str(sd2_like_model)))
    path = save_single_file(want, tmp_path / "sd2.safetensors")
    keys = load_file(path).keys()
    assert CHECKPOINT_KEY_NAMES["open_clip"] in keys
    assert "cond_stage_model.model.transformer.resblocks.1.attn.in_proj_weight" in keys
    assert not any(key.startswith("cond_stage_model.transformer.") for key in keys)
    assert "model.diffusion_model.input_blocks.3.0.op.weight" in keys  # after two resnets
    assert "model.diffusion_model.output_blocks.2.2.conv.weight" in keys  # after the attention
    got = load_components(ModelConfig(pretrained=str(path), single_file_config=str(sd2_like_model)))
    assert_same_models(got, want)


def test_unrecognised_file_without_config_says_what_to_set(single_file: Path) -> None:
    # Offline, diffusers cannot fetch the SD 1.5 configs it guesses (and they would not fit anyway).
    with pytest.raises(ConfigError, match=r"model\.single_file_config="):
        load_components(ModelConfig(pretrained=str(single_file)))


def test_config_of_another_architecture_is_named(single_file: Path, sd2_like_model: Path) -> None:
    with pytest.raises(ConfigError, match=r"^model\.single_file_config: .*does not match"):
        load_components(ModelConfig(pretrained=str(single_file), single_file_config=str(sd2_like_model)))


@pytest.mark.parametrize("where", ["missing", "file"])
def test_single_file_config_must_be_a_folder(single_file: Path, tmp_path: Path, where: str) -> None:
    config = tmp_path / "nowhere" if where == "missing" else single_file
    with pytest.raises(ConfigError, match=r"^model\.single_file_config: .*not a diffusers folder"):
        load_pipeline(ModelConfig(pretrained=str(single_file), single_file_config=str(config)))


def test_save_options(reference: Components, single_file: Path, tmp_path: Path) -> None:
    with pytest.raises(ExportExistsError):
        save_single_file(reference, single_file)
    with pytest.raises(ValueError, match="safetensors"):
        save_single_file(reference, tmp_path / "model.ckpt")
    with pytest.raises(TypeError, match="strings"):
        save_single_file(reference, tmp_path / "bad.safetensors", metadata={"steps": 3})
    assert not list(tmp_path.iterdir())  # nothing half-written
    half = save_single_file(reference, tmp_path / "half.safetensors", dtype=torch.float16)
    assert {t.dtype for t in load_file(half).values()} == {torch.float16}
    save_single_file(reference, half, overwrite=True)
    assert {t.dtype for t in load_file(half).values()} == {torch.float32}


def test_lora_must_be_fused_and_then_exports_merged(tmp_path: Path) -> None:
    pipe = build_tiny_pipeline()
    weight = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight"
    base = pipe.unet.state_dict()[weight].clone()
    lora = LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_v"], init_lora_weights=False)
    pipe.unet.add_adapter(lora)
    with pytest.raises(ValueError, match="fuse"):
        pipeline_to_ldm(pipe)
    pipe.fuse_lora(components=["unet"])
    pipe.unload_lora_weights()
    state = pipeline_to_ldm(pipe)
    fused = pipe.unet.state_dict()[weight]
    assert not torch.equal(fused, base)
    key = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight"
    torch.testing.assert_close(state[key], fused, rtol=0, atol=0)
