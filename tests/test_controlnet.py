"""method=controlnet on the tiny model: training, the exported folder and single file, validation grids."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import compose_config, fast_overrides
from diffusers import ControlNetModel, StableDiffusionControlNetPipeline, UNet2DConditionModel
from PIL import Image
from safetensors import safe_open

from finetune.convert_controlnet import PREFIX, controlnet_to_ldm, load_controlnet_file, save_controlnet_file
from finetune.errors import ConfigError
from finetune.methods.controlnet import embedding_channels
from finetune.train import train


@pytest.fixture(scope="module")
def controlnet_run(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory):
    run_dir = tmp_path_factory.mktemp("controlnet")
    overrides = fast_overrides(tiny_model, run_dir, steps=4) + [
        "method=controlnet",
        "data.conditioning=canny",
        "optim.lr=1e-3",
    ]
    return train(compose_config(overrides))


def _inputs(controlnet: ControlNetModel, size: int = 16):
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 4, size, size, generator=generator)
    text = torch.randn(2, 77, controlnet.config.cross_attention_dim, generator=generator)
    factor = 2 ** (len(controlnet.config.conditioning_embedding_out_channels) - 1)
    condition = torch.rand(2, 3, size * factor, size * factor, generator=generator)
    return latents, torch.tensor([10, 500]), text, condition


def _residuals(controlnet: ControlNetModel, inputs) -> list[torch.Tensor]:
    latents, timesteps, text, condition = inputs
    with torch.no_grad():
        down, mid = controlnet(latents, timesteps, text, controlnet_cond=condition, return_dict=False)
    return [*down, mid]


def test_conditioning_embedding_matches_the_vae_factor(controlnet_run):
    controlnet = controlnet_run.module.controlnet
    assert tuple(controlnet.config.conditioning_embedding_out_channels) == embedding_channels(2) == (16, 32)
    assert embedding_channels(8) == (16, 32, 96, 256)  # SD's


def test_exported_folder_loads_and_gives_the_trained_residuals(controlnet_run):
    run_dir, trained = controlnet_run.run_dir, controlnet_run.module.controlnet.eval()
    loaded = ControlNetModel.from_pretrained(run_dir / "controlnet")
    inputs = _inputs(trained)
    for ours, theirs in zip(_residuals(trained, inputs), _residuals(loaded, inputs), strict=True):
        assert torch.allclose(ours, theirs, atol=1e-6)
    # It trained: the zero convolutions no longer output zeros.
    assert any(r.abs().max() > 0 for r in _residuals(loaded, inputs))


def test_exported_folder_drives_the_diffusers_controlnet_pipeline(controlnet_run, tiny_model):
    controlnet = ControlNetModel.from_pretrained(controlnet_run.run_dir / "controlnet")
    pipe = StableDiffusionControlNetPipeline.from_pretrained(
        tiny_model, controlnet=controlnet, safety_checker=None, requires_safety_checker=False
    )
    edges = Image.new("RGB", (32, 32))
    out = pipe("a red circle", image=edges, num_inference_steps=2, output_type="np", height=32, width=32)
    assert out.images.shape == (1, 32, 32, 3)


def test_single_file_is_in_the_original_layout_and_converts_back(controlnet_run):
    run_dir, trained = controlnet_run.run_dir, controlnet_run.module.controlnet
    with safe_open(run_dir / "controlnet.safetensors", "pt") as handle:
        keys = set(handle.keys())
        assert handle.metadata()["method"] == "controlnet"
    assert f"{PREFIX}input_hint_block.0.weight" in keys and f"{PREFIX}input_hint_block.6.weight" in keys
    assert f"{PREFIX}zero_convs.0.0.weight" in keys and f"{PREFIX}middle_block_out.0.weight" in keys
    back = load_controlnet_file(run_dir / "controlnet.safetensors", run_dir / "controlnet")
    for name, value in trained.state_dict().items():
        assert torch.equal(back.state_dict()[name], value.cpu()), name


def test_sd_shaped_controlnet_file_loads_with_diffusers_from_single_file(tiny_model, tmp_path):
    """With SD's 4-level hint embedding, diffusers' own single-file loader reads our file exactly."""
    unet = UNet2DConditionModel.from_pretrained(tiny_model, subfolder="unet")
    controlnet = ControlNetModel.from_unet(unet)  # diffusers' default embedding: (16, 32, 96, 256)
    torch.manual_seed(0)
    for parameter in controlnet.parameters():  # zero convs start at zero: give every weight a value
        parameter.data.normal_()
    controlnet.save_pretrained(tmp_path / "config")
    save_controlnet_file(controlnet, tmp_path / "cn.safetensors", {})
    loaded = ControlNetModel.from_single_file(
        str(tmp_path / "cn.safetensors"), config=str(tmp_path / "config"), local_files_only=True
    )
    for name, value in controlnet.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], value), name
    assert set(controlnet_to_ldm(controlnet)) == {
        PREFIX + k for k in _original_keys(tmp_path / "cn.safetensors")
    }


def _original_keys(path: Path) -> set[str]:
    with safe_open(path, "pt") as handle:
        return {key.removeprefix(PREFIX) for key in handle.keys()}


def test_validation_grid_shows_conditioning_then_samples(controlnet_run):
    grid = Image.open(controlnet_run.run_dir / "samples" / "step_000004.png")
    # One prompt: its edge map, then 2 samples; 128-px tiles with 2-px padding.
    assert grid.size == (2 + 3 * (128 + 2), 128 + 4)


def test_controlnet_without_conditioning_images_fails_at_config_time(tiny_model, tmp_path):
    overrides = fast_overrides(tiny_model, tmp_path, steps=1) + ["method=controlnet"]
    with pytest.raises(ConfigError, match="method=controlnet needs conditioning images"):
        train(compose_config(overrides))
