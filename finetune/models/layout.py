"""What a model says about itself without loading it: read from its config files (a local diffusers
folder, or a hub model already in the local cache) or a single file's key names."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

# Every Stable Diffusion VAE (1.x, 2.x, XL) halves the image three times.
DEFAULT_VAE_FACTOR = 8


def vae_scale_factor(vae_config: Mapping[str, Any]) -> int:
    """How many pixels one latent spans per side, from a VAE's config: it halves the image once per
    block after the first (8 for SD 1.x, 2.x and XL; 2 for the tiny model)."""
    return 2 ** (len(vae_config["block_out_channels"]) - 1)


def vae_factor(model: Any) -> int:
    """`vae_scale_factor` of `model.pretrained` without loading it: from `vae/config.json` of a local
    folder or a cached hub model; SD's 8 for anything else (single files, hub ids not yet downloaded)."""
    config = _vae_config_file(str(model.pretrained or ""), model.revision)
    if config is None:
        return DEFAULT_VAE_FACTOR
    return vae_scale_factor(json.loads(config.read_text()))


def _vae_config_file(pretrained: str, revision: str | None) -> Path | None:
    return _model_file(pretrained, "vae/config.json", revision)


def _model_file(pretrained: str, name: str, revision: str | None) -> Path | None:
    """A file of a local diffusers folder, or of a hub model already in the local cache, or None."""
    folder = Path(pretrained).expanduser()
    if folder.is_dir():
        path = folder / name
        return path if path.is_file() else None
    if pretrained.count("/") != 1 or folder.suffix:  # not a hub id (e.g. a .safetensors file)
        return None
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(pretrained, name, revision=revision)
    return Path(cached) if isinstance(cached, str) else None


def is_sdxl_model(model: Any) -> bool | None:
    """Whether `model.pretrained` is SDXL (from a folder's model_index.json, or a .safetensors file's
    key names); None if unknown."""
    single_file = Path(str(model.pretrained or "")).expanduser()
    if single_file.suffix == ".safetensors" and single_file.is_file():
        from safetensors import safe_open

        with safe_open(str(single_file), "pt") as weights:  # reads the header only
            # SDXL's original layout keeps its second text encoder (OpenCLIP) under this prefix.
            return any(key.startswith("conditioner.embedders.1.") for key in weights.keys())
    index = _model_file(str(model.pretrained or ""), "model_index.json", model.revision)
    if index is None:
        return None
    return index_is_sdxl(json.loads(index.read_text()))


def index_is_sdxl(index: dict) -> bool:
    """A pipeline's model_index.json names a second text encoder only for SDXL."""
    entry = index.get("text_encoder_2")
    return bool(entry) and entry[0] is not None
