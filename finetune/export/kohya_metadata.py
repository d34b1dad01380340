"""The headers of exported LoRA files: what kohya sd-scripts writes (`ss_*`, `sshs_*`) and the SAI
model spec (`modelspec.*`), which A1111, ComfyUI and model sites read."""

from __future__ import annotations

import datetime
import hashlib
import os
import re

import safetensors.torch
import torch

# Caller metadata keys (generic names) that kohya / A1111 tools know under another name.
# fmt: off
KOHYA_KEYS = {
    "base_model": "ss_sd_model_name", "steps": "ss_steps", "epochs": "ss_epoch",
    "num_train_images": "ss_num_train_images", "batch_size": "ss_total_batch_size",
    "learning_rate": "ss_learning_rate", "lr_scheduler": "ss_lr_scheduler", "optimizer": "ss_optimizer",
    "mixed_precision": "ss_mixed_precision", "seed": "ss_seed", "noise_offset": "ss_noise_offset",
    "snr_gamma": "ss_min_snr_gamma", "tag_frequency": "ss_tag_frequency", "clip_skip": "ss_clip_skip",
    "max_token_length": "ss_max_token_length",
}
# fmt: on
# ...and the ones the SAI model spec (`modelspec.*`, read by ComfyUI and others) defines.
MODELSPEC_KEYS = ("title", "description", "author", "license", "usage_hint", "trigger_phrase", "tags")
_SGM = "https://github.com/Stability-AI/generative-models"  # modelspec implementation of SDXL LoRA


def merge_metadata(into: dict[str, str], computed: dict[str, str]) -> dict[str, str]:
    """Add `computed` to the caller's keys; a caller value that contradicts the weights is an error."""
    for key, value in computed.items():
        given = into.get(key, value)
        if given != value and not (_is_number(given) and _is_number(value) and float(given) == float(value)):
            raise ValueError(f"metadata {key}={given!r} contradicts the adapter ({value!r})")
        into[key] = value
    return into


def _is_number(text: str) -> bool:
    return re.fullmatch(r"-?\d+(\.\d*)?", text) is not None


def _base_model_version(unet: torch.nn.Module, prediction_type: str | None) -> tuple[str, str, str]:
    """(ss_base_model_version, modelspec architecture, modelspec implementation) from the U-Net config."""
    config = unet.config
    if config.get("addition_embed_type") == "text_time":
        return "sdxl_base_v1-0", "stable-diffusion-xl-v1-base", _SGM
    if config.get("cross_attention_dim") == 1024:
        if prediction_type in ("v", "v_prediction"):
            return "sd_v2_v", "stable-diffusion-v2-768-v", "diffusers"
        return "sd_v2", "stable-diffusion-v2-512", "diffusers"
    return "sd_v1", "stable-diffusion-v1", "diffusers"


def _parse_resolution(text: str) -> tuple[int, int] | None:
    """ "512" -> (512, 512); "768x512", "768,512" or "(768, 512)" -> (768, 512)."""
    sizes = [int(n) for n in re.findall(r"\d+", text)]
    return (sizes[0], sizes[-1]) if len(sizes) in (1, 2) else None


def finish_time(trained_at: str | None = None) -> datetime.datetime:
    """When training finished, for export headers: the caller's `trained_at` (ISO 8601) when given,
    so every header of one export names the same moment; else now, in UTC."""
    if trained_at:
        return datetime.datetime.fromisoformat(trained_at)
    return datetime.datetime.now(datetime.timezone.utc)


def kohya_metadata(
    common: dict[str, str],
    state_dict: dict[str, torch.Tensor],
    unet: torch.nn.Module,
    default_title: str,
    network: dict[str, str],
) -> dict[str, str]:
    """The header kohya sd-scripts writes (`ss_*`, `sshs_*`) plus the SAI model spec (`modelspec.*`).

    `network`: the adapter's `ss_network_module`, `ss_network_dim`, `ss_network_alpha` (and
    `ss_network_args`)."""
    prediction = common.get("prediction_type")
    version, architecture, implementation = _base_model_version(unet, prediction)
    data_hash = _tensor_data_sha256(state_dict)
    finished = finish_time(common.get("trained_at"))
    computed = {
        **network,
        "ss_base_model_version": version,
        "ss_v2": str(version.startswith("sd_v2")),
        "ss_training_finished_at": str(finished.timestamp()),
        # A1111 identifies LoRA files by this hash of the tensor bytes; precomputed saves it a file read.
        "sshs_model_hash": data_hash,
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": f"{architecture}/lora",
        "modelspec.implementation": implementation,
        "modelspec.date": finished.replace(microsecond=0).isoformat(),
        "modelspec.hash_sha256": f"0x{data_hash}",
    }
    for generic, kohya_key in KOHYA_KEYS.items():
        if generic in common:
            computed[kohya_key] = common[generic]
    if "base_model" in common and os.path.exists(common["base_model"]):
        # kohya keeps only the folder/file name of a local base model: the full path is the user's business.
        computed["ss_sd_model_name"] = os.path.basename(os.path.normpath(common["base_model"]))
    for key in MODELSPEC_KEYS:
        if key in common:
            computed[f"modelspec.{key}"] = common[key]
    computed.setdefault("modelspec.title", default_title)
    resolution = _parse_resolution(common.get("resolution", ""))
    if resolution is not None:
        computed["ss_resolution"] = str(resolution)  # kohya writes the (width, height) tuple
        computed["modelspec.resolution"] = f"{resolution[0]}x{resolution[1]}"
    if prediction is not None:
        computed["modelspec.prediction_type"] = "v" if prediction in ("v", "v_prediction") else prediction
    # Keys derived from the weights must agree with any caller value; the other kohya keys the caller
    # may set itself (e.g. its own modelspec.title or ss_sd_model_name).
    owned = ("ss_network_", "sshs_", "modelspec.hash_")
    return merge_metadata(
        dict(common), {k: v for k, v in computed.items() if k not in common or k.startswith(owned)}
    )


def _tensor_data_sha256(state_dict: dict[str, torch.Tensor]) -> str:
    """SHA-256 of the safetensors data section (all bytes after the header), as A1111 computes it.

    The data section does not depend on the header, so hashing a header-less serialisation gives the
    hash of the file we are about to write.
    """
    raw = safetensors.torch.save(state_dict)
    header_size = int.from_bytes(raw[:8], "little")
    return hashlib.sha256(raw[8 + header_size :]).hexdigest()
