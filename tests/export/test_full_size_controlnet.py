"""The ControlNet original-layout file at full size: an SD 1.5 ControlNet with random weights.

Built once in float16 for SD 1.5's U-Net (scripts/bench_models.py), written with
`save_controlnet_file`, and read back by diffusers' own `ControlNetModel.from_single_file`, offline,
with `config=` a folder holding only its config.json, so every weight comes from the file.
"""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest
import torch
from diffusers import ControlNetModel, UNet2DConditionModel
from diffusers.loaders.single_file_utils import infer_diffusers_model_type
from safetensors import safe_open

from finetune.export.controlnet_file import PREFIX, save_controlnet_file

pytestmark = pytest.mark.slow


def random_controlnet(unet_config: dict) -> ControlNetModel:
    """diffusers' ControlNet for a U-Net of `unet_config`, every weight random, made in float16."""
    with torch.device("meta"):  # only the U-Net's config is read: no weights needed
        unet = UNet2DConditionModel(**unet_config)
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float16)
    try:
        controlnet = ControlNetModel.from_unet(unet, load_weights_from_unet=False)
    finally:
        torch.set_default_dtype(default)
    # The zero convolutions start at zero: give them values, or their residuals would say nothing.
    zeroed = [*controlnet.controlnet_down_blocks, controlnet.controlnet_mid_block]
    for module in [*zeroed, controlnet.controlnet_cond_embedding.conv_out]:
        for parameter in module.parameters():
            parameter.data.normal_(0, 0.05)
    return controlnet


@pytest.fixture(scope="module")
def controlnets(bench_models, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    """The source ControlNet, its file, and what diffusers loads back from that file."""
    folder = tmp_path_factory.mktemp("controlnet")
    path = folder / "controlnet.safetensors"
    models = {"source": random_controlnet(bench_models.SD15_UNET), "path": path}
    try:
        models["source"].save_config(folder / "config")
        save_controlnet_file(models["source"], path, {})
        models["loaded"] = ControlNetModel.from_single_file(
            str(path), config=str(folder / "config"), torch_dtype=torch.float16, local_files_only=True
        )
        yield models
    finally:
        path.unlink(missing_ok=True)
        models.clear()
        gc.collect()


def test_file_is_recognised_as_an_sd15_controlnet(controlnets: dict) -> None:
    with safe_open(controlnets["path"], "pt") as handle:
        shapes = {key: handle.get_slice(key).get_shape() for key in handle.keys()}
    meta = {key: torch.empty(shape, device="meta") for key, shape in shapes.items()}
    assert infer_diffusers_model_type(meta) == "controlnet"
    # One zero convolution per encoder step (conv_in, 2 x 4 resnets, 3 downsamplers), the mid one,
    # and SD's 4-level hint embedding: convolutions 0, 2, ..., 14 (a SiLU between each).
    assert {key.split(".")[2] for key in shapes if key.startswith(f"{PREFIX}zero_convs.")} == {
        str(n) for n in range(12)
    }
    assert shapes[f"{PREFIX}middle_block_out.0.weight"] == [1280, 1280, 1, 1]
    hint = {int(key.split(".")[2]) for key in shapes if key.startswith(f"{PREFIX}input_hint_block.")}
    assert hint == set(range(0, 15, 2))
    assert shapes[f"{PREFIX}input_hint_block.14.weight"] == [320, 256, 3, 3]
    assert shapes[f"{PREFIX}input_blocks.11.0.in_layers.2.weight"] == [1280, 1280, 3, 3]


def test_weights_come_back_bit_for_bit(controlnets: dict) -> None:
    want, got = controlnets["source"].state_dict(), controlnets["loaded"].state_dict()
    assert got.keys() == want.keys()
    for key, value in want.items():
        assert got[key].dtype == value.dtype and torch.equal(got[key], value), key


def residuals(controlnet: ControlNetModel) -> list[torch.Tensor]:
    """The 12 down residuals and the mid one, on fixed small inputs (8x8 latents), run in float32
    (float16 convolutions are very slow on CPUs; float16 -> float32 -> float16 is exact)."""
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(1, 4, 8, 8, generator=generator)
    text = torch.randn(1, 77, controlnet.config.cross_attention_dim, generator=generator)
    condition = torch.rand(1, 3, 64, 64, generator=generator)  # 8x the latents, as SD's embedding wants
    controlnet.to(torch.float32)
    try:
        with torch.no_grad():
            down, mid = controlnet(
                latents, torch.tensor([500]), text, controlnet_cond=condition, return_dict=False
            )
    finally:
        controlnet.to(torch.float16)
    return [*down, mid]


def test_controlnet_gives_the_same_residuals(controlnets: dict) -> None:
    want, got = residuals(controlnets["source"]), residuals(controlnets["loaded"])
    assert len(want) == len(got) == 13
    for index, (ours, theirs) in enumerate(zip(got, want, strict=True)):
        assert torch.isfinite(theirs).all() and theirs.abs().max() > 0, index  # would say nothing
        torch.testing.assert_close(ours, theirs, msg=f"residual {index}")
