"""`method=controlnet`: a ControlNet trained beside the frozen base U-Net."""

from __future__ import annotations

import logging
import math
from contextlib import nullcontext
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from diffusers import ControlNetModel

from finetune.config.errors import ConfigError
from finetune.config.methods import ControlNetMethodConfig
from finetune.models.loading import Components
from finetune.models.prompts import TextConditioning
from finetune.training.methods.adapters import add_lora

log = logging.getLogger(__name__)

# diffusers' conditioning embedding for SD (8x VAE): three stride-2 convolutions. Smaller VAE
# factors keep the first entries, one stride-2 step per halving.
_EMBEDDING_CHANNELS = (16, 32, 96, 256)


def embedding_channels(factor: int) -> tuple[int, ...]:
    """`conditioning_embedding_out_channels` whose downsampling equals the VAE's `factor`."""
    steps = int(math.log2(factor))
    if 2**steps != factor or not 0 <= steps < len(_EMBEDDING_CHANNELS):
        raise ConfigError(f"method=controlnet: a VAE factor of {factor} is not supported (1, 2, 4 or 8)")
    return _EMBEDDING_CHANNELS[: steps + 1]


def load_controlnet(cfg: ControlNetMethodConfig, components: Components) -> ControlNetModel:
    """From `method.pretrained` (folder, hub id or single file), or a copy of the base U-Net's encoder."""
    if cfg.pretrained is None:
        channels = embedding_channels(components.vae_factor)
        return ControlNetModel.from_unet(components.unet, conditioning_embedding_out_channels=channels)
    from finetune.export.controlnet_file import read_controlnet

    return read_controlnet(str(cfg.pretrained), cfg.pretrained_config, key="method.pretrained")


class ControlNetMethod:
    """Trains the ControlNet (all of it, or a LoRA on it), optionally a LoRA on the U-Net too."""

    name = "controlnet"

    def __init__(self, cfg: ControlNetMethodConfig) -> None:
        self.cfg = cfg

    def prepare(self, components: Components) -> Components:
        cfg = self.cfg
        controlnet = load_controlnet(cfg, components).to(torch.float32)
        if cfg.lora_rank:
            add_lora(controlnet, cfg.lora_rank, None, cfg.lora_target_modules)
        else:
            controlnet.requires_grad_(True)
        if components.unet.is_gradient_checkpointing:
            controlnet.enable_gradient_checkpointing()
        if cfg.unet_lora_rank:
            add_lora(components.unet, cfg.unet_lora_rank, None, cfg.lora_target_modules)
        controlnet.train()
        return replace(components, controlnet=controlnet)

    def trainable_modules(self, components: Components) -> list[torch.nn.Module]:
        return [components.controlnet] + ([components.unet] if self.cfg.unet_lora_rank else [])

    def denoise(
        self,
        components: Components,
        noisy_latents: torch.Tensor,
        timesteps: torch.Tensor,
        text: TextConditioning,
        batch: dict[str, torch.Tensor],
    ) -> torch.Tensor:
        """The U-Net's prediction with the ControlNet's residuals added, as at inference."""
        controlnet = components.controlnet
        down, mid = controlnet(
            noisy_latents,
            timesteps,
            encoder_hidden_states=text.hidden,
            controlnet_cond=batch["conditioning_pixel_values"].to(controlnet.dtype),
            conditioning_scale=self.cfg.conditioning_scale,
            added_cond_kwargs=text.added,  # SDXL's pooled text and sizes; None for SD
            return_dict=False,
        )
        dtype = components.unet.dtype
        return components.unet(
            noisy_latents,
            timesteps,
            text.hidden,
            down_block_additional_residuals=[residual.to(dtype) for residual in down],
            mid_block_additional_residual=mid.to(dtype),
            added_cond_kwargs=text.added,
            return_dict=False,
        )[0]

    def callbacks(self) -> list:
        return []

    def inference_weights(self) -> Any:
        return nullcontext()

    def summary(self) -> dict[str, Any]:
        return {
            "method": "controlnet",
            "conditioning_scale": self.cfg.conditioning_scale,
            "lora_rank": self.cfg.lora_rank or 0,
            "unet_lora_rank": self.cfg.unet_lora_rank or 0,
        }

    def export(self, components: Components, run_dir: Path, metadata: dict[str, str]) -> dict[str, Path]:
        """`<run_dir>/controlnet/` (a diffusers folder) and `controlnet.safetensors` (original layout;
        SD 1.x / 2.x only)."""
        from finetune.export.controlnet import export_controlnet

        single_file, unet_lora = self.cfg.save_single_file, bool(self.cfg.unet_lora_rank)
        if single_file and components.is_sdxl:
            log.warning(
                "method.save_single_file: the original-layout ControlNet file is written for SD 1.x / 2.x "
                "only; ComfyUI and A1111 also load the diffusers file in %s",
                run_dir / "controlnet",
            )
            single_file = False
        return export_controlnet(components, run_dir, metadata, single_file=single_file, unet_lora=unet_lora)
