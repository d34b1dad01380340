"""Export trained LoRA adapters: a diffusers file and a kohya-format file, both with metadata.

`<run_dir>/adapter/` gets:
  pytorch_lora_weights.safetensors  diffusers layout (`unet.…`, `text_encoder.…`), what
                                    `StableDiffusionPipeline.save_lora_weights` writes and
                                    `load_lora_weights(dir)` reads back, rank/alpha included.
  lora_kohya.safetensors            kohya sd-scripts layout (`lora_unet_…`, `lora_te_…`), what
                                    A1111 / ComfyUI load; also `load_lora_weights(dir, weight_name=…)`.
Tensors keep the adapter's dtype (float32 in this project) unless `dtype` is given; kohya `.alpha`
tensors are 0-dim float32. Every header value is a string.
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Iterator
from pathlib import Path

import safetensors.torch
import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
from diffusers.loaders.lora_base import LORA_ADAPTER_METADATA_KEY, LORA_WEIGHT_NAME_SAFE
from peft.tuners.lora import LoraLayer
from peft.utils import get_peft_model_state_dict

from finetune.config.errors import ExportExistsError
from finetune.config.files import atomic_dir, check_finite
from finetune.export.kohya_metadata import kohya_metadata, merge_metadata

ADAPTER_NAME = "default"
DIFFUSERS_WEIGHT_NAME = LORA_WEIGHT_NAME_SAFE  # "pytorch_lora_weights.safetensors"
DEFAULT_KOHYA_NAME = "lora_kohya.safetensors"


def export_lora(
    out_dir: Path,
    unet: torch.nn.Module,
    text_encoder: torch.nn.Module | None = None,
    *,
    metadata: dict[str, str],
    text_encoder_2: torch.nn.Module | None = None,
    kohya_name: str = DEFAULT_KOHYA_NAME,
    dtype: torch.dtype | None = None,
    overwrite: bool = False,
    adapter_name: str = ADAPTER_NAME,
) -> dict[str, Path]:
    """Write the diffusers and kohya files into `out_dir`; returns {"diffusers": path, "kohya": path}.

    `metadata` (string values: base_model, steps, resolution, num_train_images, …) goes into both
    headers verbatim; rank, alpha and target modules come from the peft config on the models.
    `text_encoder_2`: SDXL's second text encoder, when its LoRA trained too.
    """
    out_dir = Path(out_dir)
    _check_kohya_name(kohya_name)
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise ExportExistsError(f"export directory {out_dir} is not empty; choose a fresh one or overwrite")
    # Build everything before touching the disk, so that a bad model or metadata leaves nothing behind.
    models = adapted_models(unet, text_encoder, text_encoder_2)
    common = _common_metadata(metadata, models, adapter_name)
    kohya_sd = kohya_state_dict(unet, text_encoder, text_encoder_2, adapter_name=adapter_name, dtype=dtype)
    kohya_header = kohya_metadata(common, kohya_sd, unet, Path(kohya_name).stem)
    layers = {
        f"{prefix}_lora_layers": _diffusers_layers(model, adapter_name, dtype) for prefix, model in models
    }
    for name, tensors in {"kohya": kohya_sd, **layers}.items():
        check_finite(tensors, f"export ({name})")
    diffusers_header = {**common, "format": "pt"}
    # diffusers reads rank/alpha/targets back from this key; without it alpha would silently become rank.
    diffusers_header[LORA_ADAPTER_METADATA_KEY] = _lora_adapter_metadata(models, adapter_name)
    # The SDXL pipeline's writer also knows `text_encoder_2.`; for the rest both write the same file.
    pipeline = StableDiffusionXLPipeline if text_encoder_2 is not None else StableDiffusionPipeline

    # Both files appear together or not at all (an existing folder's other files are kept).
    with atomic_dir(out_dir, replace=overwrite) as folder:
        if overwrite and out_dir.is_dir():
            shutil.copytree(out_dir, folder, dirs_exist_ok=True)
        # diffusers packs the key prefixes; our save_function adds our header.
        pipeline.save_lora_weights(
            save_directory=folder,
            **layers,
            weight_name=DIFFUSERS_WEIGHT_NAME,
            save_function=lambda weights, name: safetensors.torch.save_file(
                weights, name, metadata=diffusers_header
            ),
        )
        safetensors.torch.save_file(kohya_sd, folder / kohya_name, metadata=kohya_header)
    return {"diffusers": out_dir / DIFFUSERS_WEIGHT_NAME, "kohya": out_dir / kohya_name}


def adapted_models(
    unet: torch.nn.Module, text_encoder: torch.nn.Module | None, text_encoder_2: torch.nn.Module | None = None
) -> list[tuple[str, torch.nn.Module]]:
    """(diffusers key prefix, model) for each model whose adapter is exported."""
    models = [("unet", unet), ("text_encoder", text_encoder), ("text_encoder_2", text_encoder_2)]
    return [(prefix, model) for prefix, model in models if model is not None]


def kohya_state_dict(
    unet: torch.nn.Module,
    text_encoder: torch.nn.Module | None = None,
    text_encoder_2: torch.nn.Module | None = None,
    *,
    adapter_name: str = ADAPTER_NAME,
    dtype: torch.dtype | None = None,
) -> dict[str, torch.Tensor]:
    """LoRA weights in kohya's layout: `lora_unet_<path with . → _>.lora_down.weight` / `.lora_up.weight`
    / `.alpha`, and `lora_te_…` for the text encoder (classic `text_model.` CLIP paths); SDXL's two
    text encoders are `lora_te1_…` and `lora_te2_…`."""
    out: dict[str, torch.Tensor] = {}
    sdxl = text_encoder_2 is not None
    kohya = {
        "unet": "lora_unet",
        "text_encoder": "lora_te1" if sdxl else "lora_te",
        "text_encoder_2": "lora_te2",
    }
    for diffusers_prefix, model in adapted_models(unet, text_encoder, text_encoder_2):
        prefix = kohya[diffusers_prefix]
        config = _peft_config(model, adapter_name)
        if config.use_dora or config.lora_bias:
            raise ValueError("kohya export supports plain LoRA only (no DoRA, no lora_bias)")
        for path, layer in _lora_layers(model, adapter_name):
            name = f"{prefix}_{_classic_path(model, path).replace('.', '_')}"
            rank = layer.r[adapter_name]
            # kohya scales by alpha / rank; rsLoRA scales by alpha / sqrt(rank): store the equivalent.
            alpha = layer.lora_alpha[adapter_name] * (math.sqrt(rank) if config.use_rslora else 1.0)
            # peft's lora_A / lora_B have exactly kohya's lora_down / lora_up shapes (conv too).
            out[f"{name}.lora_down.weight"] = _prepare(layer.lora_A[adapter_name].weight, dtype)
            out[f"{name}.lora_up.weight"] = _prepare(layer.lora_B[adapter_name].weight, dtype)
            out[f"{name}.alpha"] = torch.tensor(float(alpha), dtype=torch.float32)
    if not any(key.startswith("lora_unet_") for key in out):
        raise ValueError(f"the U-Net has no LoRA adapter {adapter_name!r} to export")
    return out


def _lora_layers(model: torch.nn.Module, adapter_name: str) -> Iterator[tuple[str, LoraLayer]]:
    for path, module in model.named_modules():
        if not isinstance(module, LoraLayer) or adapter_name not in module.r:
            continue
        if adapter_name not in module.lora_A:  # e.g. an nn.Embedding adapter: no kohya equivalent
            raise ValueError(f"cannot export LoRA on {path} ({type(module).__name__}) to kohya format")
        yield path.removeprefix("base_model.model."), module  # a PeftModel wrapper adds this prefix


def _classic_path(model: torch.nn.Module, path: str) -> str:
    """Module path as in the classic CLIPTextModel layout (`text_model.encoder…`).

    transformers 5 flattened CLIPTextModel (no `.text_model`), but kohya, A1111, ComfyUI and older
    diffusers all name text-encoder LoRA keys from the classic layout.
    """
    flat_clip = not hasattr(model, "text_model") and all(hasattr(model, a) for a in ("encoder", "embeddings"))
    if flat_clip and not path.startswith("text_projection"):
        return f"text_model.{path}"
    return path


def _diffusers_layers(model: torch.nn.Module, adapter_name: str, dtype: torch.dtype | None) -> dict:
    peft_sd = get_peft_model_state_dict(model, adapter_name=adapter_name)
    # Keys stay in peft form (`….lora_A.weight`), as diffusers' own `save_lora_adapter` writes them.
    # Not `convert_state_dict_to_diffusers`: it renames only attention keys, and diffusers' U-Net
    # loader looks at the first key alone to pick a format, so a mix silently drops the other half.
    return {_classic_path(model, key): _prepare(value, dtype) for key, value in peft_sd.items()}


def _prepare(tensor: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    tensor = tensor.detach().to("cpu")
    return (tensor if dtype is None else tensor.to(dtype)).contiguous()


def _peft_config(model: torch.nn.Module, adapter_name: str):
    configs = getattr(model, "peft_config", None) or {}
    if adapter_name not in configs:
        raise ValueError(f"{type(model).__name__} has no LoRA adapter {adapter_name!r} to export")
    return configs[adapter_name]


def _targets(config) -> str:
    targets = config.target_modules
    return targets if isinstance(targets, str) else ",".join(sorted(targets))


def _common_metadata(
    metadata: dict[str, str], models: list[tuple[str, torch.nn.Module]], adapter_name: str
) -> dict[str, str]:
    bad = [key for key, value in metadata.items() if not (isinstance(key, str) and isinstance(value, str))]
    if bad:
        raise TypeError(f"safetensors metadata must be str -> str; not so for {bad}")
    if LORA_ADAPTER_METADATA_KEY in metadata or "format" in metadata:
        raise ValueError(f"metadata keys 'format' and {LORA_ADAPTER_METADATA_KEY!r} belong to the exporter")
    computed = {}
    for prefix, model in models:
        config = _peft_config(model, adapter_name)
        name = "" if prefix == "unet" else f"{prefix}_"  # the U-Net's are plain rank / alpha
        computed[f"{name}rank"] = str(config.r)
        computed[f"{name}alpha"] = str(config.lora_alpha)
        computed[f"{name}target_modules"] = _targets(config)
    return merge_metadata(dict(metadata), computed)


def _lora_adapter_metadata(models: list[tuple[str, torch.nn.Module]], adapter_name: str) -> str:
    """The LoraConfig of each model, JSON-encoded under `unet.` / `text_encoder.` … as diffusers reads it."""
    packed = {}
    for prefix, model in models:
        for key, value in _peft_config(model, adapter_name).to_dict().items():
            packed[f"{prefix}.{key}"] = sorted(value) if isinstance(value, set) else value
    return json.dumps(packed, indent=2, sort_keys=True)


def _check_kohya_name(name: str) -> None:
    if Path(name).name != name or not name.endswith(".safetensors"):
        raise ValueError(f"kohya_name must be a plain file name ending in .safetensors, not {name!r}")
    # diffusers' folder loader prefers any file ending in its own name, which would make it ambiguous.
    if name.endswith(DIFFUSERS_WEIGHT_NAME):
        raise ValueError(f"kohya_name {name!r} clashes with the diffusers file {DIFFUSERS_WEIGHT_NAME}")
