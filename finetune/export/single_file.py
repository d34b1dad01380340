"""Convert a diffusers Stable Diffusion 1.x/2.x pipeline to one checkpoint file in the original layout.

The original (CompVis/LDM) layout is what A1111 and ComfyUI read, and what diffusers'
`from_single_file` converts back from:

  model.diffusion_model.*               U-Net (`input_blocks` / `middle_block` / `output_blocks`)
  first_stage_model.*                   AutoencoderKL (`encoder.down.N.block.M`, `decoder.up.N` …)
  cond_stage_model.transformer.*        SD 1.x text encoder (OpenAI CLIP, `text_model.…` as in HF)
  cond_stage_model.model.*              SD 2.x text encoder (OpenCLIP: `resblocks`, fused q/k/v)

diffusers installs only the other direction (`diffusers.loaders.single_file_utils`), so the reverse
mapping is ours. It is built from the modules each model actually has, not from SD's fixed block
counts, so small test models convert the same way as real ones; `tests/export/test_single_file.py` checks
it by loading the file back through `from_single_file` and comparing outputs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextModel

from finetune.config.errors import ExportExistsError
from finetune.config.files import save_safetensors

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
TEXT_ENCODER_PREFIX = "cond_stage_model."

# (diffusers module path, original module path, renames of the module's own children)
Rule = tuple[str, str, dict[str, str]]

_UNET_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
_VAE_RESNET = {"conv_shortcut": "nin_shortcut"}
_VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
_OPEN_CLIP_LAYER = {
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
    "self_attn.out_proj": "attn.out_proj",
}


class SDComponents(Protocol):
    """Anything holding SD's three models: a `StableDiffusionPipeline` or `models.loading.Components`.
    Their scheduler's config, when they have one, says what the U-Net predicts (the file's markers)."""

    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text_encoder: CLIPTextModel


def unet_to_ldm(unet: UNet2DConditionModel) -> dict[str, torch.Tensor]:
    """U-Net weights under their original names (without the `model.diffusion_model.` prefix)."""
    rules = encoder_rules(unet) + [("conv_norm_out", "out.0", {}), ("conv_out", "out.2", {})]
    index = 0
    for b, block in enumerate(unet.up_blocks):
        for j in range(len(block.resnets)):
            rules.append((f"up_blocks.{b}.resnets.{j}", f"output_blocks.{index}.0", _UNET_RESNET))
            rules.append((f"up_blocks.{b}.attentions.{j}", f"output_blocks.{index}.1", {}))
            index += 1
        if block.upsamplers is not None:
            # The upsampler joins the block's last step, after its attention when there is one.
            slot = 2 if hasattr(block, "attentions") else 1
            rules.append((f"up_blocks.{b}.upsamplers.0.conv", f"output_blocks.{index - 1}.{slot}.conv", {}))
    return rename(unfused_weights(unet), rules, "U-Net")


def encoder_rules(model: torch.nn.Module) -> list[Rule]:
    """Renames for the parts a U-Net and a ControlNet share: time embedding, input and middle blocks.

    The original model is a flat list of steps: one per resnet (with its attention, if any), then
    one per downsampler; entry 0 is `conv_in`.
    """
    rules: list[Rule] = [
        ("conv_in", "input_blocks.0.0", {}),
        ("time_embedding.linear_1", "time_embed.0", {}),
        ("time_embedding.linear_2", "time_embed.2", {}),
    ]
    index = 1
    for b, block in enumerate(model.down_blocks):
        for j in range(len(block.resnets)):
            rules.append((f"down_blocks.{b}.resnets.{j}", f"input_blocks.{index}.0", _UNET_RESNET))
            rules.append((f"down_blocks.{b}.attentions.{j}", f"input_blocks.{index}.1", {}))
            index += 1
        if block.downsamplers is not None:
            rules.append((f"down_blocks.{b}.downsamplers.0.conv", f"input_blocks.{index}.0.op", {}))
            index += 1
    if model.mid_block is not None:  # resnet, attention, resnet
        for k in range(len(model.mid_block.resnets)):
            rules.append((f"mid_block.resnets.{k}", f"middle_block.{2 * k}", _UNET_RESNET))
            rules.append((f"mid_block.attentions.{k}", f"middle_block.{2 * k + 1}", {}))
    return rules


def vae_to_ldm(vae: AutoencoderKL) -> dict[str, torch.Tensor]:
    """VAE weights under their original names (without the `first_stage_model.` prefix)."""
    rules: list[Rule] = [("quant_conv", "quant_conv", {}), ("post_quant_conv", "post_quant_conv", {})]
    for part in ("encoder", "decoder"):
        rules += [(f"{part}.{name}", f"{part}.{name}", {}) for name in ("conv_in", "conv_out")]
        rules.append((f"{part}.conv_norm_out", f"{part}.norm_out", {}))
        mid = getattr(vae, part).mid_block
        for k in range(len(mid.resnets)):
            rules.append((f"{part}.mid_block.resnets.{k}", f"{part}.mid.block_{k + 1}", _VAE_RESNET))
        rules.append((f"{part}.mid_block.attentions.0", f"{part}.mid.attn_1", _VAE_ATTENTION))
    for i, block in enumerate(vae.encoder.down_blocks):
        ours, theirs = f"encoder.down_blocks.{i}", f"encoder.down.{i}"
        for j in range(len(block.resnets)):
            rules.append((f"{ours}.resnets.{j}", f"{theirs}.block.{j}", _VAE_RESNET))
        rules.append((f"{ours}.downsamplers.0.conv", f"{theirs}.downsample.conv", {}))
    levels = len(vae.decoder.up_blocks)
    for i, block in enumerate(vae.decoder.up_blocks):
        # diffusers lists decoder blocks from the latent end; the original numbers them by resolution.
        ours, theirs = f"decoder.up_blocks.{i}", f"decoder.up.{levels - 1 - i}"
        for j in range(len(block.resnets)):
            rules.append((f"{ours}.resnets.{j}", f"{theirs}.block.{j}", _VAE_RESNET))
        rules.append((f"{ours}.upsamplers.0.conv", f"{theirs}.upsample.conv", {}))
    converted = rename(unfused_weights(vae), rules, "VAE")
    # The original mid-block attention uses 1x1 convolutions where diffusers uses linear layers.
    for key, value in converted.items():
        if ".mid.attn_1." in key and key.endswith(".weight") and value.ndim == 2:
            converted[key] = value[:, :, None, None]
    return converted


def text_encoder_to_ldm(text_encoder: CLIPTextModel) -> dict[str, torch.Tensor]:
    """Text-encoder weights under their original names (without the `cond_stage_model.` prefix).

    SD 1.x's OpenAI CLIP (quick_gelu) keeps the Hugging Face names under `transformer.text_model.`;
    SD 2.x's OpenCLIP (gelu) goes back to OpenCLIP's names with q/k/v fused.
    """
    # transformers >= 5.6 flattened CLIPTextModel (no `text_model.`); older versions nest it.
    weights = {k.removeprefix("text_model."): v for k, v in unfused_weights(text_encoder).items()}
    weights.pop("embeddings.position_ids", None)  # a constant buffer, persistent only in old versions
    if text_encoder.config.hidden_act != "gelu":
        return {f"transformer.text_model.{k}": v for k, v in weights.items()}
    return _open_clip_weights(weights, text_encoder.config.num_hidden_layers)


def pipeline_to_ldm(pipe: SDComponents, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The whole single-file state dict, on the CPU, floating tensors cast to `dtype` if given."""
    parts = (
        (UNET_PREFIX, unet_to_ldm(pipe.unet)),
        (VAE_PREFIX, vae_to_ldm(pipe.vae)),
        (TEXT_ENCODER_PREFIX, text_encoder_to_ldm(pipe.text_encoder)),
    )
    state: dict[str, torch.Tensor] = {}
    for prefix, weights in parts:
        for key, value in weights.items():
            value = value.detach().cpu()
            if dtype is not None and value.is_floating_point():
                value = value.to(dtype)
            state[prefix + key] = value.contiguous()
    # A pipeline's `scheduler`, or training's `noise_scheduler` (models.loading.Components)
    scheduler = getattr(pipe, "scheduler", None) or getattr(pipe, "noise_scheduler", None)
    return state | (schedule_markers(scheduler.config) if scheduler is not None else {})


def schedule_markers(scheduler_config: Any) -> dict[str, torch.Tensor]:
    """The empty marker tensors ComfyUI and A1111 look for in a single file whose schedule is not the
    default: `v_pred` (the U-Net predicts v) and `ztsnr` (zero terminal SNR, with `v_pred`)."""
    markers = {}
    if scheduler_config.get("prediction_type") == "v_prediction":
        markers["v_pred"] = torch.tensor([])
        if scheduler_config.get("rescale_betas_zero_snr"):
            markers["ztsnr"] = torch.tensor([])
    return markers


def save_single_file(
    pipe: SDComponents,
    path: str | Path,
    dtype: torch.dtype | None = None,
    metadata: dict[str, str] | None = None,
    *,
    overwrite: bool = False,
) -> Path:
    """Write `pipe` as one original-layout `.safetensors` file (A1111, ComfyUI, `from_single_file`).

    Written to a temp name and renamed, so a reader never sees half a file; an existing file is kept
    unless `overwrite`. Fuse LoRA adapters into the weights first (`pipe.fuse_lora()` then
    `pipe.unload_lora_weights()`): the original layout has no place for them.
    """
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"single-file checkpoints are written as .safetensors, not {path.name!r}")
    if path.exists() and not overwrite:
        raise ExportExistsError(f"{path} already exists; pass overwrite=True to replace it")
    header = {"format": "pt", **(metadata or {})}
    bad = [key for key, value in header.items() if not isinstance(key, str) or not isinstance(value, str)]
    if bad:
        raise TypeError(f"safetensors metadata must map strings to strings; not so for {bad}")
    state = pipeline_to_ldm(pipe, dtype)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_safetensors(state, path, header)
    return path


def unfused_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    state = model.state_dict()
    # Injected adapters would be renamed along with their layer and land in the file unnoticed.
    adapters = [key for key in state if ".base_layer." in key or ".lora_" in key]
    if adapters:
        raise ValueError(
            f"{type(model).__name__} has unfused adapter weights (e.g. {adapters[0]}); "
            "fuse them first: pipe.fuse_lora(); pipe.unload_lora_weights()"
        )
    return state


def rename(weights: dict[str, torch.Tensor], rules: list[Rule], what: str) -> dict[str, torch.Tensor]:
    """Rename every key by its longest matching module rule; a key no rule covers is an error."""
    ordered = sorted(rules, key=lambda rule: len(rule[0]), reverse=True)
    converted: dict[str, torch.Tensor] = {}
    missed = []
    for key, value in weights.items():
        for source, target, children in ordered:
            if key.startswith(source + "."):
                converted[f"{target}.{_rename_child(key[len(source) + 1 :], children)}"] = value
                break
        else:
            missed.append(key)
    if missed:
        # e.g. SDXL's `add_embedding`: not an SD 1.x/2.x model, so not this layout.
        raise ValueError(f"{what}: no original-layout name for {len(missed)} weights, e.g. {missed[:3]}")
    return converted


def _rename_child(rest: str, children: dict[str, str]) -> str:
    for name, new in children.items():
        if rest.startswith(name + "."):
            return new + rest[len(name) :]
    return rest


def _open_clip_weights(weights: dict[str, torch.Tensor], layers: int) -> dict[str, torch.Tensor]:
    """SD 2.x text encoder in OpenCLIP's names, as diffusers' `convert_open_clip_checkpoint` reads them.

    diffusers' SD 2.x text encoder already lacks OpenCLIP's last layer and `text_projection` (SD 2
    conditions on the penultimate layer), so they are absent here too.
    """
    out = {
        "model.token_embedding.weight": weights.pop("embeddings.token_embedding.weight"),
        "model.positional_embedding": weights.pop("embeddings.position_embedding.weight"),
        "model.ln_final.weight": weights.pop("final_layer_norm.weight"),
        "model.ln_final.bias": weights.pop("final_layer_norm.bias"),
    }
    for i in range(layers):
        source, target = f"encoder.layers.{i}.", f"model.transformer.resblocks.{i}."
        for kind in ("weight", "bias"):
            qkv = [weights.pop(f"{source}self_attn.{p}_proj.{kind}") for p in "qkv"]
            out[f"{target}attn.in_proj_{kind}"] = torch.cat(qkv)
        for name, new in _OPEN_CLIP_LAYER.items():
            for kind in ("weight", "bias"):
                out[f"{target}{new}.{kind}"] = weights.pop(f"{source}{name}.{kind}")
    if weights:
        left = list(weights)
        raise ValueError(f"text encoder: no OpenCLIP name for {len(left)} weights, e.g. {left[:3]}")
    return out
