"""SDXL: LoRA on the U-Net and both text encoders, size conditioning, cached pooled text, exports that
load into diffusers' SDXL pipeline, and the methods that are not available for SDXL yet."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import CONF_DIR, compose_config, fast_overrides
from diffusers import ControlNetModel, StableDiffusionXLPipeline
from hydra import compose, initialize_config_dir
from PIL import Image
from safetensors.torch import load_file

from finetune.config.errors import ConfigError
from finetune.generate import generate
from finetune.models.prompts import PromptEncoder, TextConditioning
from finetune.train import train
from finetune.training.checks import check_config

CAPTION = "a red circle, zkz style"


def sdxl_overrides(tiny_sdxl_model: Path, run_dir: Path, steps: int = 3) -> list[str]:
    return fast_overrides(tiny_sdxl_model, run_dir, steps=steps) + ["optim.lr=1e-2"]


def denoised(parts: object, latents: torch.Tensor, original=(40, 32), crop=(4, 0)) -> torch.Tensor:
    """The U-Net's prediction for fixed latents and CAPTION, as SDXL conditions it."""
    prompts = PromptEncoder(parts.text_encoder, parts.tokenizer, parts.text_encoder_2, parts.tokenizer_2)
    with torch.no_grad():
        text = prompts.encode(**prompts.tokenize([CAPTION]))
        sizes = torch.tensor([[*original, *crop, 32, 32]], dtype=torch.float32)
        added = {"text_embeds": text.pooled, "time_ids": sizes}
        return parts.unet(latents, 500, text.hidden, added_cond_kwargs=added).sample


@pytest.mark.slow
def test_sdxl_lora_trains_both_text_encoders_and_exports_files_diffusers_loads(
    tiny_sdxl_model: Path, tmp_path: Path
) -> None:
    overrides = sdxl_overrides(tiny_sdxl_model, tmp_path / "run") + ["method.train_text_encoder=true"]
    run = train(compose_config(overrides))
    parts = run.module.components
    assert parts.is_sdxl
    assert sorted(p.name for p in (run.run_dir / "samples").glob("step_*.png")) == [
        "step_000000.png",
        "step_000002.png",
        "step_000003.png",
    ]

    diffusers_file = load_file(run.exported["diffusers"])
    assert {key.split(".")[0] for key in diffusers_file} == {"unet", "text_encoder", "text_encoder_2"}
    kohya_file = load_file(run.exported["kohya"])
    assert {key.split("_")[1] for key in kohya_file} == {"unet", "te1", "te2"}

    latents = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(3))
    run.module.eval()
    trained = denoised(parts, latents)
    base = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_model)
    untouched = denoised(base, latents)
    assert not torch.allclose(trained, untouched, atol=1e-4)  # training changed the prediction
    for weight_name in (None, "lora_kohya.safetensors"):
        pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_model)
        pipe.load_lora_weights(run.run_dir / "adapter", weight_name=weight_name)
        torch.testing.assert_close(denoised(pipe, latents), trained, rtol=1e-4, atol=1e-5, msg=weight_name)

    # finetune-generate opens the SDXL model with its SDXL pipeline, and the adapter changes the images.
    def generated(name: str, *extra: str) -> np.ndarray:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            overrides = [f"model.pretrained={tiny_sdxl_model}", f"out_dir={tmp_path / name}", "steps=2"]
            paths = generate(
                compose(config_name="generate", overrides=[*overrides, f"prompt=[{CAPTION}]", *extra])
            )
        return np.stack([np.asarray(Image.open(path), dtype=float) for path in paths])

    plain, adapted = generated("plain"), generated("adapted", f"adapter={run.run_dir / 'adapter'}")
    assert plain.shape == adapted.shape and np.abs(plain - adapted).mean() > 0.5


@pytest.mark.slow
def test_sdxl_size_conditioning_and_cached_pooled_text(tiny_sdxl_model: Path, tmp_path: Path) -> None:
    run = train(
        compose_config(sdxl_overrides(tiny_sdxl_model, tmp_path / "run", steps=2) + ["data.cache=memory"])
    )
    module, datamodule = run.module, run.module.trainer.datamodule
    prompts = module.components.prompts
    caption = datamodule.records[0].caption
    cached = datamodule.cache.text(caption)
    with torch.no_grad():
        fresh = prompts.encode(**prompts.tokenize([caption]))
    torch.testing.assert_close(cached["text_embeds"], fresh.hidden[0])
    torch.testing.assert_close(cached["pooled_text_embeds"], fresh.pooled[0])

    # Original size (h, w), crop top-left (top, left), target size (h, w): what the U-Net is told.
    batch = {
        "text_embeds": fresh.hidden,
        "pooled_text_embeds": fresh.pooled,
        "original_size": torch.tensor([[48, 40]]),
        "crop_top_left": torch.tensor([[8, 4]]),
    }
    text = module.batch_text(batch, latents=torch.zeros(1, 4, 16, 8))
    assert isinstance(text, TextConditioning) and text.added is not None
    assert text.added["time_ids"].tolist() == [[48.0, 40.0, 8.0, 4.0, 32.0, 16.0]]  # latents x VAE factor 2
    assert text.added["text_embeds"] is fresh.pooled


@pytest.mark.slow
def test_sdxl_full_fine_tuning_exports_an_sdxl_folder_with_the_ema_weights(
    tiny_sdxl_model: Path, tmp_path: Path
) -> None:
    overrides = sdxl_overrides(tiny_sdxl_model, tmp_path / "run") + ["method=full", "optim.lr=1e-3"]
    run = train(compose_config(overrides))
    assert set(run.exported) == {"diffusers"}  # the original-layout single file is SD 1.x / 2.x only
    exported = StableDiffusionXLPipeline.from_pretrained(run.exported["diffusers"])
    base = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_model)
    module = run.module
    with module.method.inference_weights():  # the EMA weights
        trained = {name: p.detach().clone() for name, p in module.unet.named_parameters()}
    for name, parameter in exported.unet.named_parameters():
        torch.testing.assert_close(parameter, trained[name], msg=name)
    changed = [n for n, p in base.unet.named_parameters() if not torch.equal(p, trained[n])]
    assert len(changed) > len(trained) // 2  # the whole U-Net trained, not an adapter
    for ours, theirs in zip(
        exported.text_encoder_2.parameters(), base.text_encoder_2.parameters(), strict=True
    ):
        assert torch.equal(ours, theirs)  # the text encoders are the base's


@pytest.mark.slow
def test_sdxl_controlnet_trains_with_size_conditioning_and_generates_from_its_export(
    tiny_sdxl_model: Path, tmp_path: Path
) -> None:
    overrides = sdxl_overrides(tiny_sdxl_model, tmp_path / "run") + [
        "method=controlnet",
        "data.conditioning=canny",
    ]
    run = train(compose_config(overrides))
    assert set(run.exported) == {"controlnet"}  # the original-layout single file is SD 1.x / 2.x only
    trained = run.module.controlnet.eval()
    assert any(p.abs().sum() > 0 for p in trained.controlnet_mid_block.parameters())  # starts at zero

    # The exported ControlNet gives the trained one's residuals, SDXL's added conditions included.
    exported = ControlNetModel.from_pretrained(run.exported["controlnet"])
    prompts = run.module.components.prompts
    with torch.no_grad():
        text = prompts.encode(**prompts.tokenize([CAPTION]))
        added = {"text_embeds": text.pooled, "time_ids": torch.tensor([[32.0, 32.0, 0.0, 0.0, 32.0, 32.0]])}
        inputs = dict(
            sample=torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(4)),
            timestep=500,
            encoder_hidden_states=text.hidden,
            controlnet_cond=torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(5)),
            added_cond_kwargs=added,
            return_dict=False,
        )
        for ours, theirs in zip(trained(**inputs)[0], exported(**inputs)[0], strict=True):
            torch.testing.assert_close(theirs, ours)

    # finetune-generate puts it beside the SDXL model; the control image steers the result.
    Image.new("RGB", (32, 32)).save(tmp_path / "black.png")
    square = Image.new("RGB", (32, 32))
    square.paste((255, 255, 255), (8, 8, 24, 24))
    square.save(tmp_path / "square.png")

    def generated(name: str, control: str) -> np.ndarray:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            overrides = [
                f"model.pretrained={tiny_sdxl_model}",
                f"out_dir={tmp_path / name}",
                "steps=2",
                f"prompt=[{CAPTION}]",
                f"controlnet={run.exported['controlnet']}",
                f"control_image={tmp_path / control}",
                "controlnet_scale=10",
            ]
            paths = generate(compose(config_name="generate", overrides=overrides))
        return np.stack([np.asarray(Image.open(path), dtype=float) for path in paths])

    # Without the ControlNet wired into the SDXL pipeline both would be the same pixels.
    assert not np.array_equal(generated("black", "black.png"), generated("square", "square.png"))


def test_a_single_file_sdxl_checkpoint_is_refused_with_what_to_give_instead(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    checkpoint = tmp_path / "sdxl.safetensors"
    save_file({"conditioner.embedders.1.model.ln_final.weight": torch.zeros(2)}, checkpoint)
    cfg = compose_config(fast_overrides(checkpoint, tmp_path / "run"))
    with pytest.raises(ConfigError, match="single-file SDXL checkpoints are not supported yet"):
        check_config(cfg)


def test_sdxl_lokr_on_the_unet_and_both_text_encoders_fuses_back_to_the_trained_model(
    tiny_sdxl_model: Path, tmp_path: Path
) -> None:
    from finetune.export.lora_apply import fuse_file, pipeline_models
    from finetune.export.lora_file import read_lora_file

    overrides = sdxl_overrides(tiny_sdxl_model, tmp_path / "run", steps=2) + [
        "method.train_text_encoder=true"
    ]
    overrides += ["method.algo=lokr", "method.rank=4", "method.alpha=2", "validation.every_n_steps=0"]
    run = train(compose_config(overrides))
    assert "diffusers" not in run.exported  # diffusers loads no LoKr for SDXL U-Nets
    lora = read_lora_file(run.exported["kohya"])
    assert lora.algo() == "lokr" and {name.split("_")[1] for name in lora.layers} == {"unet", "te1", "te2"}

    latents = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(3))
    run.module.eval()
    trained = denoised(run.module.components, latents)
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_model)
    assert not torch.allclose(denoised(pipe, latents), trained, atol=1e-4)
    assert fuse_file(pipeline_models(pipe), lora, 1.0, key="test") == len(lora.layers)
    torch.testing.assert_close(denoised(pipe, latents), trained, atol=2e-5, rtol=1e-4)
