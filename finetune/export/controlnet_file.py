"""A diffusers ControlNet as one file in the original ControlNet layout, and back.

The original layout (lllyasviel's `cldm`) is what A1111's ControlNet extension and ComfyUI read:

  control_model.input_blocks / middle_block / time_embed   the U-Net encoder copy (as in the U-Net)
  control_model.zero_convs.N.0                              `controlnet_down_blocks.N`
  control_model.middle_block_out.0                          `controlnet_mid_block`
  control_model.input_hint_block.{0,2,...,4n-2}             `controlnet_cond_embedding` (n levels)

The renames are built from the modules the model has, so any depth converts. Those tools (and
diffusers' `from_single_file`) assume SD's shapes — 320 channels, a 4-level hint embedding for an
8x VAE — so they load real SD ControlNets, not the tiny model's; `load_controlnet_file` reads back
any file this module wrote, given the matching config.
"""

from __future__ import annotations

from pathlib import Path

import safetensors.torch
import torch
from diffusers import ControlNetModel

from finetune.config.files import save_safetensors
from finetune.export.single_file import Rule, encoder_rules, rename, unfused_weights

PREFIX = "control_model."


def controlnet_rules(controlnet: ControlNetModel) -> list[Rule]:
    """diffusers module path -> original module path, for every module with weights."""
    rules = encoder_rules(controlnet)
    rules += [
        (f"controlnet_down_blocks.{n}", f"zero_convs.{n}.0", {})
        for n in range(len(controlnet.controlnet_down_blocks))
    ]
    rules.append(("controlnet_mid_block", "middle_block_out.0", {}))
    embedding = controlnet.controlnet_cond_embedding
    # conv_in, then the blocks, then conv_out, with a SiLU (no weights) between each: even indices.
    convs = ["conv_in", *(f"blocks.{k}" for k in range(len(embedding.blocks))), "conv_out"]
    rules += [
        (f"controlnet_cond_embedding.{name}", f"input_hint_block.{2 * i}", {}) for i, name in enumerate(convs)
    ]
    return rules


def controlnet_to_ldm(controlnet: ControlNetModel) -> dict[str, torch.Tensor]:
    """The state dict under original names, `control_model.` prefixed, on the CPU."""
    renamed = rename(unfused_weights(controlnet), controlnet_rules(controlnet), "ControlNet")
    return {PREFIX + key: value.detach().cpu().contiguous() for key, value in renamed.items()}


def save_controlnet_file(controlnet: ControlNetModel, path: Path, metadata: dict[str, str]) -> Path:
    """Write the original-layout file atomically (temp name, then rename)."""
    save_safetensors(controlnet_to_ldm(controlnet), path, {"format": "pt", **metadata})
    return path


def load_controlnet_file(path: str | Path, config: str | Path) -> ControlNetModel:
    """A ControlNet from an original-layout file (prefixed or not), its architecture from `config`.

    `config` is a diffusers ControlNet folder (or hub id) with a config.json of the same shape.
    """
    model = ControlNetModel.from_config(ControlNetModel.load_config(config))
    back = {original: ours for ours, original in _key_pairs(model).items()}
    state = safetensors.torch.load_file(str(path))
    state = {key.removeprefix(PREFIX): value for key, value in state.items()}
    unknown = sorted(set(state) - set(back))
    if unknown:
        raise ValueError(
            f"{path}: {len(unknown)} weights do not fit this ControlNet config, e.g. {unknown[:3]}"
        )
    model.load_state_dict({back[key]: value for key, value in state.items()}, strict=True)
    return model


def _key_pairs(model: ControlNetModel) -> dict[str, str]:
    """Every diffusers state-dict key -> its original name (via the same rules as the export)."""
    keys = {key: torch.empty(0) for key in model.state_dict()}
    renamed = rename(keys, controlnet_rules(model), "ControlNet")
    # rename() keeps insertion order, so the n-th renamed key came from the n-th original key.
    return dict(zip(keys, renamed, strict=True))


def read_controlnet(source: str, config: str | None = None, key: str = "controlnet") -> ControlNetModel:
    """A ControlNet from a diffusers folder or hub id, or a single `.safetensors` file.

    A single file in our layout needs its architecture: `config`, or the `controlnet/` folder that
    training exports beside it. Otherwise diffusers' own single-file loader is tried (it knows SD's
    ControlNet shapes). `key` names the setting in error messages.
    """
    from finetune.config.errors import ConfigError

    path = Path(source).expanduser()
    if path.suffix not in (".safetensors", ".ckpt", ".pth"):
        try:
            return ControlNetModel.from_pretrained(source)
        except (OSError, ValueError) as error:
            raise ConfigError(f"{key}: cannot load a ControlNet from '{source}': {error}") from error
    if not path.is_file():
        raise ConfigError(f"{key}: '{path}' does not exist")
    folder = Path(config).expanduser() if config else path.parent / "controlnet"
    if (folder / "config.json").is_file():
        return load_controlnet_file(path, folder)
    try:
        return ControlNetModel.from_single_file(str(path))
    except Exception as error:  # diffusers raises many kinds (config lookup, shapes)
        raise ConfigError(
            f"{key}: cannot read '{path}' ({error}); name a folder with its config.json"
        ) from error
