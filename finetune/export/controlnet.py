"""ControlNet export: a diffusers folder, one original-layout file, and the U-Net LoRA if one trained."""

from __future__ import annotations

import copy
from pathlib import Path

from diffusers import ControlNetModel
from peft.utils import get_peft_model_state_dict

from finetune.config.errors import ExportExistsError
from finetune.config.files import atomic_dir, check_finite
from finetune.export.controlnet_file import save_controlnet_file
from finetune.export.lora import export_lora
from finetune.models.loading import Components


def plain_controlnet(controlnet: ControlNetModel) -> ControlNetModel:
    """The ControlNet with any LoRA fused into its weights (a copy; the trained one is untouched)."""
    if not getattr(controlnet, "_hf_peft_config_loaded", False):
        return controlnet
    fused = copy.deepcopy(controlnet)
    fused.fuse_lora()
    fused.unload_lora()
    return fused


def export_controlnet(
    components: Components, run_dir: Path, metadata: dict[str, str], *, single_file: bool, unet_lora: bool
) -> dict[str, Path]:
    """`<run_dir>/controlnet/` that `ControlNetModel.from_pretrained` loads; `controlnet.safetensors` for
    A1111 / ComfyUI; `<run_dir>/adapter/` with the U-Net LoRA when one trained alongside."""
    out_dir = run_dir / "controlnet"
    file = run_dir / "controlnet.safetensors"
    for existing in (out_dir, file) if single_file else (out_dir,):
        if existing.exists():  # a finished run resumed into its own folder: never replace an export
            raise ExportExistsError(f"{existing} already exists; move it away to export again")
    controlnet = plain_controlnet(components.controlnet)
    check_finite(controlnet.state_dict(), "export")  # before any file is written
    if unet_lora:
        check_finite(get_peft_model_state_dict(components.unet), "export (U-Net LoRA)")
    with atomic_dir(out_dir) as partial:  # the folder appears complete or not at all
        controlnet.save_pretrained(partial, safe_serialization=True)
    written = {"controlnet": out_dir}
    if single_file:
        written["single_file"] = save_controlnet_file(controlnet, file, metadata)
    if unet_lora:
        written.update(export_lora(run_dir / "adapter", components.unet, metadata=metadata))
    return written
