"""Export trained adapters of the LoRA family: a diffusers file and a kohya-layout file, with metadata.

`<run_dir>/adapter/` gets:
  pytorch_lora_weights.safetensors  diffusers layout (`unet.…`, `text_encoder.…`), what
                                    `StableDiffusionPipeline.save_lora_weights` writes and
                                    `load_lora_weights(dir)` reads back, rank/alpha included.
                                    LoRA, LoCon and DoRA only: diffusers loads no LoHa or LoKr for
                                    these U-Nets, so for those it is left out, and the log says so.
  lora_kohya.safetensors            kohya / LyCORIS layout (`lora_unet_…`, `lora_te_…`,
                                    `finetune.export.kohya_layout`), what A1111 and ComfyUI load for
                                    every algorithm; LoRA also `load_lora_weights(dir, weight_name=…)`.
Tensors keep the adapter's dtype (float32 in this project) unless `dtype` is given; kohya `.alpha`
tensors are 0-dim float32. Every header value is a string.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections import Counter
from pathlib import Path

import safetensors.torch
import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
from diffusers.loaders.lora_base import LORA_ADAPTER_METADATA_KEY, LORA_WEIGHT_NAME_SAFE
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict

from finetune.config.errors import ExportExistsError
from finetune.config.files import atomic_dir, check_finite
from finetune.export.kohya_layout import (
    ADAPTER_NAME,
    adapted_layers,
    classic_path,
    kohya_state_dict,
    layer_rank_alpha,
    prepare_tensor,
)
from finetune.export.kohya_metadata import kohya_metadata, merge_metadata

log = logging.getLogger(__name__)

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
    """Write the diffusers and kohya files into `out_dir`; returns {"diffusers": path, "kohya": path}
    ("diffusers" only for the algorithms diffusers loads).

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
    kohya_sd = kohya_state_dict(models, adapter_name=adapter_name, dtype=dtype)
    unet_config = _peft_config(unet, adapter_name)
    kohya_header = kohya_metadata(
        common, kohya_sd, unet, Path(kohya_name).stem, network_args(unet, adapter_name)
    )
    diffusers_loads = isinstance(unet_config, LoraConfig)  # LoRA, LoCon, DoRA
    layers = {
        f"{prefix}_lora_layers": _diffusers_layers(model, adapter_name, dtype)
        for prefix, model in models
        if diffusers_loads
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
        if layers:
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
    written = {"kohya": out_dir / kohya_name}
    if layers:
        written["diffusers"] = out_dir / DIFFUSERS_WEIGHT_NAME
    else:
        log.warning(
            "%s not written: diffusers loads no %s adapter for this U-Net; %s is for A1111 and ComfyUI",
            DIFFUSERS_WEIGHT_NAME,
            unet_config.peft_type.value,
            kohya_name,
        )
    return written


def adapted_models(
    unet: torch.nn.Module, text_encoder: torch.nn.Module | None, text_encoder_2: torch.nn.Module | None = None
) -> list[tuple[str, torch.nn.Module]]:
    """(diffusers key prefix, model) for each model whose adapter is exported."""
    models = [("unet", unet), ("text_encoder", text_encoder), ("text_encoder_2", text_encoder_2)]
    return [(prefix, model) for prefix, model in models if model is not None]


def _diffusers_layers(model: torch.nn.Module, adapter_name: str, dtype: torch.dtype | None) -> dict:
    peft_sd = get_peft_model_state_dict(model, adapter_name=adapter_name)
    # Keys stay in peft form (`….lora_A.weight`), as diffusers' own `save_lora_adapter` writes them.
    # Not `convert_state_dict_to_diffusers`: it renames only attention keys, and diffusers' U-Net
    # loader looks at the first key alone to pick a format, so a mix silently drops the other half.
    return {classic_path(model, key): prepare_tensor(value, dtype) for key, value in peft_sd.items()}


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
        computed[f"{name}alpha"] = str(config.lora_alpha if isinstance(config, LoraConfig) else config.alpha)
        computed[f"{name}target_modules"] = _targets(config)
    return merge_metadata(dict(metadata), computed)


def network_args(unet: torch.nn.Module, adapter_name: str = ADAPTER_NAME) -> dict[str, str]:
    """What kohya's header says of the network: its module, rank, alpha and the algorithm's arguments
    (LyCORIS's names, as `lycoris.kohya` writes them); A1111 and ComfyUI read the weights' own keys."""
    config = _peft_config(unet, adapter_name)
    algo = {"LORA": "lora", "LOHA": "loha", "LOKR": "lokr"}[config.peft_type.value]
    dora = getattr(config, "use_dora", False)
    linear, conv = Counter(), Counter()  # (rank, alpha) of each adapted layer
    for _, layer in adapted_layers(unet, adapter_name):
        is_conv = isinstance(layer.get_base_layer(), torch.nn.Conv2d)
        (conv if is_conv else linear)[layer_rank_alpha(layer, adapter_name)] += 1
    rank, alpha = (linear or conv).most_common(1)[0][0]
    args: dict[str, str] = {} if algo == "lora" and not dora else {"algo": algo}
    if conv:
        conv_rank, conv_alpha = conv.most_common(1)[0][0]
        args.update(conv_dim=str(conv_rank), conv_alpha=str(float(conv_alpha)))
    if dora:
        args["dora_wd"] = "True"
    if algo == "lokr":
        args.update(factor=str(config.decompose_factor), decompose_both=str(config.decompose_both))
    header = {
        # kohya's own LoRA (LoCon included) or LyCORIS's network, as each tool names it
        "ss_network_module": "lycoris.kohya" if "algo" in args else "networks.lora",
        "ss_network_dim": str(rank),
        "ss_network_alpha": str(float(alpha)),
    }
    if args:
        header["ss_network_args"] = json.dumps(args)
    return header


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
