"""method=controlnet on the tiny model: training, the exported folder and single file, validation grids."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import CONF_DIR, REPO, compose_config, fast_overrides
from diffusers import ControlNetModel, StableDiffusionControlNetPipeline, UNet2DConditionModel
from PIL import Image
from safetensors import safe_open

from finetune.config.errors import ConfigError
from finetune.config.schema import ModelConfig
from finetune.data.conditioning import canny
from finetune.export.controlnet_file import (
    PREFIX,
    controlnet_to_ldm,
    load_controlnet_file,
    save_controlnet_file,
)
from finetune.generate import generate
from finetune.models.loading import load_pipeline, with_controlnet
from finetune.tiny.control_metrics import control_scenes, placement_iou
from finetune.train import train
from finetune.training.methods.controlnet import embedding_channels


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


def _generate_config(overrides: list[str]):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="generate", overrides=overrides)


@pytest.mark.parametrize("which", ["folder", "single_file"])
def test_generate_with_the_controlnet_and_a_photo_made_into_edges(
    controlnet_run, tiny_model, tmp_path, which
):
    photos = tmp_path / "photos"
    photos.mkdir()
    for name, colour in (("sun", (250, 200, 0)), ("sea", (0, 60, 200))):
        photo = Image.new("RGB", (64, 48), colour)
        photo.paste((255, 255, 255), (20, 10, 44, 38))
        photo.save(photos / f"{name}.jpg")
    run_dir = controlnet_run.run_dir
    controlnet = run_dir / "controlnet" if which == "folder" else run_dir / "controlnet.safetensors"
    overrides = [
        f"model.pretrained={tiny_model}",
        f"controlnet={controlnet}",
        f"control_image={photos}",
        "preprocessor=canny",
        "prompt=[a red circle]",
        "count=1",
        "steps=2",
        f"out_dir={tmp_path / 'out'}",
    ]
    written = generate(_generate_config(overrides))
    assert sorted(p.name for p in written) == [
        "sea_00_a-red-circle_seed0.png",
        "sun_00_a-red-circle_seed0.png",
    ]
    assert Image.open(written[0]).size == (32, 32)


def test_generate_refuses_a_control_image_without_a_controlnet(tiny_model, tmp_path):
    overrides = [f"model.pretrained={tiny_model}", f"control_image={tmp_path}", f"out_dir={tmp_path / 'o'}"]
    with pytest.raises(ConfigError, match="control_image: set controlnet"):
        generate(_generate_config(overrides))


@pytest.mark.slow
def test_a_short_canny_run_places_objects_where_the_edges_say(tmp_path):
    """The recipe on the shipped model: samples follow the condition better than with a blank one."""
    overrides = ["experiment=controlnet_canny", f"run_dir={tmp_path}"]  # 400 steps
    overrides += ["validation.every_n_steps=0", "validation.prompts=[]", "logger=none"]
    result = train(compose_config(overrides))

    base = load_pipeline(ModelConfig(pretrained=str(REPO / "data" / "tiny-sd"), resolution=32))
    pipe = with_controlnet(base, ControlNetModel.from_pretrained(result.run_dir / "controlnet"))
    thresholds = SimpleNamespace(canny_low=100, canny_high=200)
    iou = placement_iou(pipe, control_scenes(16, seed=1000), lambda s: canny(s, thresholds), steps=20)
    assert iou["with_condition"] > iou["blank_condition"] + 0.1, iou


def test_lora_on_the_controlnet_and_the_unet_exports_fused_controlnet_and_adapter(tiny_model, tmp_path):
    overrides = fast_overrides(tiny_model, tmp_path, steps=2) + [
        "method=controlnet",
        "method.lora_rank=4",
        "method.unet_lora_rank=4",
        "data.conditioning=canny",
        "optim.lr=1e-2",
    ]
    result = train(compose_config(overrides))
    trainable = {n for n, p in result.module.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in name for name in trainable)  # only adapters train
    assert any(n.startswith("controlnet.") for n in trainable) and any(
        n.startswith("unet.") for n in trainable
    )
    exported = ControlNetModel.from_pretrained(tmp_path / "controlnet")
    assert not any("lora" in key for key in exported.state_dict())  # fused into plain weights
    inputs = _inputs(exported)
    trained = _residuals(result.module.controlnet.eval(), inputs)
    for ours, theirs in zip(trained, _residuals(exported, inputs), strict=True):
        assert torch.allclose(ours, theirs, atol=1e-5)
    assert (tmp_path / "adapter" / "pytorch_lora_weights.safetensors").is_file()


@pytest.mark.slow
def test_controlnet_resumes_in_bf16_with_cached_latents(tiny_model, tmp_path):
    common = [
        "method=controlnet",
        "data.conditioning=canny",
        "trainer.precision=bf16-mixed",
        "data.cache=memory",
    ]
    first = train(compose_config(fast_overrides(tiny_model, tmp_path / "a", steps=2) + common))
    checkpoint = tmp_path / "a" / "checkpoints" / "last.ckpt"
    saved = torch.load(checkpoint, weights_only=False)["state_dict"]
    assert saved and all(key.startswith("controlnet.") for key in saved)  # only what trains
    # Resumed with nothing left to train, the ControlNet is exactly the one the first run ended with.
    overrides = fast_overrides(tiny_model, tmp_path / "b", steps=2) + common + [f"resume={checkpoint}"]
    resumed = train(compose_config(overrides))
    assert resumed.global_step == 2
    assert resumed.module.controlnet.dtype == torch.float32  # trains in fp32 under bf16 autocast
    restored = resumed.module.controlnet.state_dict()
    for name, value in first.module.controlnet.state_dict().items():
        assert torch.equal(restored[name], value), name


def test_validation_conditioning_images_are_preprocessed_photos(tiny_model, tmp_path):
    photo = Image.new("RGB", (64, 64), (30, 30, 30))
    photo.paste((250, 250, 250), (16, 16, 48, 48))
    photo.save(tmp_path / "photo.png")
    overrides = fast_overrides(tiny_model, tmp_path / "run", steps=1) + [
        "method=controlnet",
        "data.conditioning=canny",
        f"validation.conditioning_images=[{tmp_path / 'photo.png'}]",
    ]
    train(compose_config(overrides))
    grid = np.asarray(Image.open(tmp_path / "run" / "samples" / "step_000001.png").convert("L"))
    first_tile = grid[2:130, 2:130]  # the conditioning image, enlarged 4x: the square's edges
    assert first_tile[0:20].max() == 0  # black above the square
    assert first_tile[28:36, 28:100].max() == 255  # its top edge (y = 8 at 32 px)


@pytest.mark.parametrize("which", ["controlnet", "controlnet.safetensors"])
def test_method_pretrained_continues_from_an_exported_controlnet(controlnet_run, tiny_model, tmp_path, which):
    from finetune.config.methods import ControlNetMethodConfig
    from finetune.models.loading import load_components
    from finetune.training.methods.controlnet import ControlNetMethod

    components = load_components(ModelConfig(pretrained=str(tiny_model), resolution=32))
    method = ControlNetMethod(ControlNetMethodConfig(pretrained=str(controlnet_run.run_dir / which)))
    prepared = method.prepare(components)
    assert components.controlnet is None  # what a method adds comes back in new components
    trained = controlnet_run.module.controlnet.state_dict()
    for name, value in prepared.controlnet.state_dict().items():
        assert torch.equal(value, trained[name].cpu()), name
    missing = ControlNetMethod(ControlNetMethodConfig(pretrained=str(tmp_path / "nothing.safetensors")))
    with pytest.raises(ConfigError, match="method.pretrained: .* does not exist"):
        missing.prepare(components)
