"""LoRA export: both files load back into a fresh pipeline and reproduce the trained model's outputs."""

import hashlib
import json
import re
from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionPipeline
from peft.tuners.lora import LoraLayer
from safetensors import safe_open
from safetensors.torch import load_file

from finetune.config.errors import FinetuneError
from finetune.export.kohya_layout import kohya_state_dict
from finetune.export.lora import (
    DEFAULT_KOHYA_NAME,
    DIFFUSERS_WEIGHT_NAME,
    ExportExistsError,
    adapted_models,
    export_lora,
)
from finetune.training.methods.adapters import add_lora

UNET_DEFAULT = ["to_q", "to_k", "to_v", "to_out.0"]
# What users add beyond attention: linear and 1x1 / 3x3 convolutions in transformer and resnet blocks.
UNET_WIDE = UNET_DEFAULT + [
    "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1", "conv2", "conv_shortcut", "time_emb_proj",
]  # fmt: skip
TE_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1"]
METADATA = {"base_model": "some/base-model", "steps": "120", "resolution": "512", "num_train_images": "7"}


@pytest.fixture
def base(tiny_model: Path) -> Path:
    """The tiny SD pipeline as a diffusers folder (conftest, which also sets HF_HUB_OFFLINE=1)."""
    return tiny_model


def trained_pipeline(
    base: Path,
    unet_targets: list[str],
    rank: int,
    alpha: float,
    te_targets: list[str] | None = None,
) -> StableDiffusionPipeline:
    """A pipeline with LoRA whose weights are non-zero (peft's gaussian init leaves lora_B at zero)."""
    pipe = StableDiffusionPipeline.from_pretrained(base)
    add_lora(pipe.unet, rank, alpha, unet_targets)
    models = [pipe.unet]
    if te_targets:
        add_lora(pipe.text_encoder, rank // 2, alpha + 1, te_targets)
        models.append(pipe.text_encoder)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for model in models:
            for name, param in model.named_parameters():
                if "lora_B" in name:
                    param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
    return pipe


def outputs(pipe: StableDiffusionPipeline) -> tuple[torch.Tensor, torch.Tensor]:
    """(text-encoder hidden states, U-Net noise prediction) on fixed inputs."""
    tokenizer = pipe.tokenizer
    ids = tokenizer(
        ["a photo of a cat"], padding="max_length", max_length=tokenizer.model_max_length, return_tensors="pt"
    ).input_ids
    latents = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        text = pipe.text_encoder(ids)[0]
        noise = pipe.unet(latents, 500, encoder_hidden_states=text).sample
    return text, noise


def reloaded(base: Path, adapter: Path, weight_name: str | None = None) -> StableDiffusionPipeline:
    pipe = StableDiffusionPipeline.from_pretrained(base)
    pipe.load_lora_weights(adapter, weight_name=weight_name)
    return pipe


def assert_differs(a: torch.Tensor, b: torch.Tensor) -> None:
    assert (a - b).abs().max() > 1e-2


def lora_scalings(model: torch.nn.Module) -> set[float]:
    return {s for m in model.modules() if isinstance(m, LoraLayer) for s in m.scaling.values()}


@pytest.mark.parametrize("weight_name", [None, DEFAULT_KOHYA_NAME])
def test_unet_lora_reloads_with_same_outputs(base: Path, tmp_path: Path, weight_name: str | None) -> None:
    base_text, base_noise = outputs(StableDiffusionPipeline.from_pretrained(base))
    trained = trained_pipeline(base, UNET_DEFAULT, rank=4, alpha=8)
    _, trained_noise = outputs(trained)
    export_lora(tmp_path / "adapter", trained.unet, metadata=METADATA)

    # weight_name=None: the folder alone must resolve to the diffusers file despite the kohya file beside it.
    pipe = reloaded(base, tmp_path / "adapter", weight_name)
    text, noise = outputs(pipe)
    torch.testing.assert_close(noise, trained_noise, atol=1e-5, rtol=1e-4)
    assert_differs(noise, base_noise)
    torch.testing.assert_close(text, base_text)  # no text-encoder LoRA was exported
    # alpha != rank survives: peft scales by alpha / rank.
    assert lora_scalings(pipe.unet) == {2.0}


@pytest.mark.parametrize("weight_name", [None, DEFAULT_KOHYA_NAME])
def test_text_encoder_and_wide_targets_reload(base: Path, tmp_path: Path, weight_name: str | None) -> None:
    base_text, base_noise = outputs(StableDiffusionPipeline.from_pretrained(base))
    trained = trained_pipeline(base, UNET_WIDE, rank=4, alpha=2, te_targets=TE_TARGETS)
    trained_text, trained_noise = outputs(trained)
    export_lora(tmp_path / "adapter", trained.unet, trained.text_encoder, metadata=METADATA)

    pipe = reloaded(base, tmp_path / "adapter", weight_name)
    text, noise = outputs(pipe)
    torch.testing.assert_close(text, trained_text, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(noise, trained_noise, atol=1e-5, rtol=1e-4)
    assert_differs(text, base_text)
    assert_differs(noise, base_noise)
    assert lora_scalings(pipe.unet) == {0.5}
    assert lora_scalings(pipe.text_encoder) == {1.5}  # text encoder: rank 2, alpha 3


def test_kohya_key_layout(base: Path) -> None:
    trained = trained_pipeline(base, UNET_WIDE, rank=4, alpha=2, te_targets=TE_TARGETS)
    sd = kohya_state_dict(adapted_models(trained.unet, trained.text_encoder))

    pattern = re.compile(r"^lora_(unet|te)_[A-Za-z0-9_]+\.(lora_down\.weight|lora_up\.weight|alpha)$")
    assert all(pattern.match(key) for key in sd), [key for key in sd if not pattern.match(key)]
    attn = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_out_0"
    ff = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_ff_net_0_proj"
    conv = "lora_unet_down_blocks_0_resnets_0_conv1"
    te = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
    for name in (attn, ff, conv, te, "lora_unet_up_blocks_1_resnets_0_conv_shortcut"):
        assert {f"{name}.lora_down.weight", f"{name}.lora_up.weight", f"{name}.alpha"} <= sd.keys()

    modules = {key.rsplit(".", 2)[0] if key.endswith(".weight") else key.rsplit(".", 1)[0] for key in sd}
    peft_layers = [m for model in (trained.unet, trained.text_encoder) for m in model.modules()]
    assert len(modules) * 3 == len(sd) == 3 * sum(isinstance(m, LoraLayer) for m in peft_layers)

    assert sd[f"{attn}.alpha"].shape == () and sd[f"{attn}.alpha"].dtype == torch.float32
    assert sd[f"{attn}.alpha"].item() == 2.0 and sd[f"{te}.alpha"].item() == 3.0
    layer = trained.unet.down_blocks[0].resnets[0].conv1
    torch.testing.assert_close(sd[f"{conv}.lora_down.weight"], layer.lora_A["default"].weight)
    torch.testing.assert_close(sd[f"{conv}.lora_up.weight"], layer.lora_B["default"].weight)
    assert sd[f"{conv}.lora_down.weight"].shape == (4, 32, 3, 3)  # kohya: 3x3 down, 1x1 up
    assert sd[f"{conv}.lora_up.weight"].shape == (32, 4, 1, 1)


def data_sha256(path: Path) -> str:
    """A1111's hash of a safetensors file: everything after the header."""
    raw = path.read_bytes()
    return hashlib.sha256(raw[8 + int.from_bytes(raw[:8], "little") :]).hexdigest()


def test_metadata_in_both_headers(base: Path, tmp_path: Path) -> None:
    trained = trained_pipeline(base, UNET_DEFAULT, rank=4, alpha=8)
    paths = export_lora(tmp_path / "adapter", trained.unet, metadata={**METADATA, "title": "my style"})
    headers = {}
    for kind, path in paths.items():
        with safe_open(path, framework="pt") as f:
            headers[kind] = f.metadata()
    ours = {"rank": "4", "alpha": "8", "target_modules": "to_k,to_out.0,to_q,to_v"}
    for header in headers.values():
        assert header.items() >= {**METADATA, **ours}.items()

    diffusers = headers["diffusers"]
    assert diffusers["format"] == "pt"
    adapter_config = json.loads(diffusers["lora_adapter_metadata"])
    assert adapter_config["unet.r"] == 4 and adapter_config["unet.lora_alpha"] == 8

    kohya = headers["kohya"]
    assert (
        kohya.items()
        >= {
            "ss_network_module": "networks.lora",
            "ss_network_dim": "4",
            "ss_network_alpha": "8.0",
            "ss_sd_model_name": "some/base-model",
            "ss_steps": "120",
            "ss_num_train_images": "7",
            "ss_resolution": "(512, 512)",
            "ss_base_model_version": "sd_v1",
            "ss_v2": "False",
            "modelspec.sai_model_spec": "1.0.0",
            "modelspec.architecture": "stable-diffusion-v1/lora",
            "modelspec.implementation": "diffusers",
            "modelspec.title": "my style",
            "modelspec.resolution": "512x512",
        }.items()
    )
    assert kohya["sshs_model_hash"] == data_sha256(paths["kohya"])
    assert kohya["modelspec.hash_sha256"] == "0x" + kohya["sshs_model_hash"]
    assert "lora_adapter_metadata" not in kohya  # diffusers refuses it together with kohya alphas


def test_bad_metadata_is_refused_before_writing(base: Path, tmp_path: Path) -> None:
    trained = trained_pipeline(base, UNET_DEFAULT, rank=4, alpha=8)
    with pytest.raises(ValueError, match="rank"):
        export_lora(tmp_path / "a", trained.unet, metadata={"rank": "16"})
    with pytest.raises(TypeError):
        export_lora(tmp_path / "a", trained.unet, metadata={"steps": 120})  # type: ignore[dict-item]
    with pytest.raises(ValueError, match="kohya_name"):
        export_lora(tmp_path / "a", trained.unet, metadata={}, kohya_name="x_" + DIFFUSERS_WEIGHT_NAME)
    assert not (tmp_path / "a").exists()
    export_lora(tmp_path / "a", trained.unet, metadata={"rank": "4", "alpha": "8.0"})  # agreeing is fine


def test_existing_export_is_not_overwritten(base: Path, tmp_path: Path) -> None:
    trained = trained_pipeline(base, UNET_DEFAULT, rank=4, alpha=8)
    out = tmp_path / "adapter"
    paths = export_lora(out, trained.unet, metadata=METADATA)
    before = {kind: path.read_bytes() for kind, path in paths.items()}

    with pytest.raises(ExportExistsError) as raised:
        export_lora(out, trained.unet, metadata={**METADATA, "steps": "999"})
    assert isinstance(raised.value, FinetuneError) and isinstance(raised.value, FileExistsError)
    assert {kind: path.read_bytes() for kind, path in paths.items()} == before

    export_lora(out, trained.unet, metadata={**METADATA, "steps": "999"}, overwrite=True, dtype=torch.float16)
    # No temp files left behind.
    assert sorted(p.name for p in out.iterdir()) == sorted([DEFAULT_KOHYA_NAME, DIFFUSERS_WEIGHT_NAME])
    kohya = load_file(paths["kohya"])
    assert {v.dtype for k, v in kohya.items() if not k.endswith(".alpha")} == {torch.float16}
    assert {v.dtype for k, v in kohya.items() if k.endswith(".alpha")} == {torch.float32}
    assert {v.dtype for v in load_file(paths["diffusers"]).values()} == {torch.float16}
    with safe_open(paths["kohya"], framework="pt") as f:
        assert f.metadata()["ss_steps"] == "999"


def test_every_header_date_is_the_run_s_finish_time(base: Path, tmp_path: Path) -> None:
    pipe = trained_pipeline(base, UNET_DEFAULT, rank=4, alpha=4)
    metadata = {**METADATA, "trained_at": "2023-11-14T22:13:20+00:00"}
    written = export_lora(tmp_path / "adapter", pipe.unet, metadata=metadata)
    with safe_open(written["kohya"], "pt") as handle:
        header = handle.metadata()
    assert header["trained_at"] == header["modelspec.date"] == "2023-11-14T22:13:20+00:00"
    assert header["ss_training_finished_at"] == "1700000000.0"
