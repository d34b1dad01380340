"""Read a LoRA-family file of either layout into one form: layers in kohya naming, with their tensors.

Two layouts are read:
  kohya / LyCORIS  `lora_unet_<path>.lora_down.weight`, `….alpha`, `….hada_w1_a`, `….lokr_w1`, …
                   (what A1111, ComfyUI and `lora_kohya.safetensors` hold)
  diffusers (peft) `unet.<path>.lora_A.weight`, `….lora_B.weight`, `….lora_magnitude_vector`, with
                   rank and alpha in the header's `lora_adapter_metadata` (what
                   `pytorch_lora_weights.safetensors` holds)
A layer's tensors are renamed to the kohya names (`lora_down.weight`, `lora_up.weight`, `alpha`,
`dora_scale`, …); kohya layer names are `<prefix>_<module path with . → _>`, the prefix one of
`lora_unet`, `lora_te` (`lora_te1` / `lora_te2` for SDXL).
"""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from finetune.config.errors import ConfigError
from finetune.config.files import check_finite, save_safetensors
from finetune.export.kohya_layout import classic_path

DIFFUSERS_PREFIXES = {"unet": "lora_unet", "text_encoder": "lora_te", "text_encoder_2": "lora_te2"}
_PEFT_NAMES = {"lora_A.weight": "lora_down.weight", "lora_B.weight": "lora_up.weight"}
_ALGO_MARKERS = (("hada_w1_a", "loha"), ("lokr_w1", "lokr"), ("lokr_w1_a", "lokr"), ("dora_scale", "dora"))


@dataclass
class LoraFile:
    """A LoRA-family file read into kohya naming: {layer name: {tensor name: tensor}} and its header."""

    layers: dict[str, dict[str, torch.Tensor]]
    metadata: dict[str, str]
    layout: str  # "kohya" or "diffusers": the layout it was read from

    def algo(self) -> str:
        """lora, dora, loha or lokr: what the layers hold (LoCon is LoRA with convolution layers)."""
        found = {
            algo for tensors in self.layers.values() for marker, algo in _ALGO_MARKERS if marker in tensors
        }
        if len(found) > 1:
            raise ConfigError(
                f"the file mixes algorithms ({', '.join(sorted(found))}); one at a time is read"
            )
        return found.pop() if found else "lora"

    def rank(self, layer: str) -> int:
        tensors = self.layers[layer]
        for name in ("lora_down.weight", "hada_w1_b", "lokr_w2_b", "lokr_w1_b"):
            if name in tensors:
                return int(tensors[name].shape[0])
        return max(tensors["lokr_w2"].shape)  # a LoKr layer of whole matrices: no rank of its own

    def alpha(self, layer: str) -> float:
        tensors = self.layers[layer]
        return float(tensors["alpha"].item()) if "alpha" in tensors else float(self.rank(layer))

    def common_rank(self) -> int:
        return Counter(self.rank(layer) for layer in self.layers).most_common(1)[0][0]

    def common_alpha(self) -> float:
        return Counter(self.alpha(layer) for layer in self.layers).most_common(1)[0][0]


def read_lora_file(path: str | Path) -> LoraFile:
    """The file at `path` in kohya naming; one line naming the file when it is neither layout."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such LoRA file")
    if path.suffix != ".safetensors":
        raise ConfigError(f"{path}: LoRA files are read as .safetensors only")
    with safe_open(path, "pt") as handle:
        metadata = dict(handle.metadata() or {})
    tensors = load_file(path)
    if tensors and all(
        key.split(".", 1)[0].startswith(tuple(DIFFUSERS_PREFIXES.values())) for key in tensors
    ):
        return LoraFile(_kohya_layers(tensors), metadata, "kohya")
    if tensors and all(key.split(".", 1)[0] in DIFFUSERS_PREFIXES for key in tensors):
        return LoraFile(_diffusers_layers(tensors, metadata), metadata, "diffusers")
    raise ConfigError(f"{path}: not a LoRA file this reads (kohya `lora_unet_…` or diffusers `unet.…` keys)")


def _kohya_layers(tensors: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    layers: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        layer, name = key.split(".", 1)
        layers.setdefault(layer, {})[name] = value
    return layers


def _diffusers_layers(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> dict[str, dict]:
    sdxl = any(key.startswith("text_encoder_2.") for key in tensors)
    configs = json.loads(metadata.get("lora_adapter_metadata", "{}"))
    layers: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        model, rest = key.split(".", 1)
        match = re.fullmatch(r"(.+)\.(lora_A\.weight|lora_B\.weight|lora_magnitude_vector)", rest)
        if match is None:
            raise ConfigError(
                f"diffusers LoRA key {key!r}: only peft's lora_A / lora_B / magnitude keys are read"
            )
        path, name = match.groups()
        prefix = "lora_te1" if sdxl and model == "text_encoder" else DIFFUSERS_PREFIXES[model]
        layer = layers.setdefault(f"{prefix}_{path.replace('.', '_')}", {})
        layer[_PEFT_NAMES.get(name, "dora_scale")] = value
        if name == "lora_A.weight":
            layer["alpha"] = torch.tensor(_diffusers_alpha(configs, model, path, value.shape[0]))
    for tensors_of_layer in layers.values():  # DoRA's magnitude, shaped (out, 1, …) as kohya files have it
        if "dora_scale" in tensors_of_layer:
            up = tensors_of_layer["lora_up.weight"]
            tensors_of_layer["dora_scale"] = tensors_of_layer["dora_scale"].reshape(
                up.shape[0], *[1] * (up.dim() - 1)
            )
    return layers


def _diffusers_alpha(configs: dict, model: str, path: str, rank: int) -> float:
    """A layer's alpha from the LoraConfig diffusers keeps in the header (alpha = rank without one)."""
    patterns = configs.get(f"{model}.alpha_pattern") or {}
    for pattern, alpha in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", path):
            return float(alpha)
    return float(configs.get(f"{model}.lora_alpha", rank))


def layers_for(
    lora: LoraFile, model: torch.nn.Module, prefix: str, key: str = "method.init_from"
) -> dict[str, str]:
    """{kohya layer name: module path} of the file's layers that belong to `model` (kohya `prefix`)."""
    ours = {
        f"{prefix}_{classic_path(model, path).replace('.', '_')}": path
        for path, module in model.named_modules()
        if isinstance(module, torch.nn.Linear | torch.nn.Conv2d)
    }
    wanted = [name for name in lora.layers if name.startswith(f"{prefix}_")]
    missing = [name for name in wanted if name not in ours]
    if missing:
        raise ConfigError(
            f"{key}: {len(missing)} layers of the file are not in this model (e.g. {missing[0]}); "
            "was it trained on another base model?"
        )
    return {name: ours[name] for name in wanted}


def check_output(out: str | Path, inputs: list[str | Path]) -> Path:
    """`out` as a path that is safe to write: never one of the inputs, never an existing file."""
    out = Path(out)
    if out.suffix != ".safetensors":
        raise ConfigError(f"out: {out} must end in .safetensors")
    if any(out.resolve() == Path(source).resolve() for source in inputs):
        raise ConfigError(f"out: {out} is one of the inputs; inputs are never overwritten")
    if out.exists():
        raise ConfigError(f"out: {out} already exists; choose a new name")
    return out


def write_lora_file(
    lora: LoraFile, out: Path, *, layout: str = "kohya", module_paths: dict[str, str] | None = None
) -> Path:
    """Write `lora` in `layout` (kohya, or diffusers: that needs each layer's module path)."""
    if layout == "kohya":
        tensors = {
            f"{layer}.{name}": value
            for layer, values in lora.layers.items()
            for name, value in values.items()
        }
        metadata = dict(lora.metadata)
    elif layout == "diffusers":
        tensors, metadata = _as_diffusers(lora, module_paths or {})
    else:
        raise ConfigError(f"to: '{layout}' is not one of kohya, diffusers")
    tensors = {key: value.detach().to("cpu").contiguous() for key, value in tensors.items()}
    check_finite(tensors, f"{out.name}")
    save_safetensors(tensors, out, {key: str(value) for key, value in metadata.items()})
    return out


def _as_diffusers(lora: LoraFile, module_paths: dict[str, str]) -> tuple[dict, dict[str, str]]:
    if lora.algo() not in ("lora", "dora"):
        raise ConfigError(
            f"to: diffusers loads no {lora.algo()} adapter for these models; keep the kohya layout"
        )
    models = {prefix: model for model, prefix in DIFFUSERS_PREFIXES.items()} | {"lora_te1": "text_encoder"}
    tensors: dict[str, torch.Tensor] = {}
    configs: dict[str, dict] = {}
    for layer, values in lora.layers.items():
        prefix = next(p for p in sorted(models, key=len, reverse=True) if layer.startswith(f"{p}_"))
        model, path = models[prefix], module_paths[layer]
        tensors[f"{model}.{path}.lora_A.weight"] = values["lora_down.weight"]
        tensors[f"{model}.{path}.lora_B.weight"] = values["lora_up.weight"]
        if "dora_scale" in values:  # peft keeps a convolution's magnitude as (1, out, 1, 1)
            magnitude = values["dora_scale"].flatten()
            conv = values["lora_down.weight"].dim() == 4
            tensors[f"{model}.{path}.lora_magnitude_vector"] = (
                magnitude.reshape(1, -1, 1, 1) if conv else magnitude
            )
        config = configs.setdefault(model, {"rank_pattern": {}, "alpha_pattern": {}, "target_modules": []})
        # Keys name text-encoder layers in the classic CLIP layout (`text_model.encoder…`); targets without
        # that prefix match the classic and the flattened (transformers 5) models alike.
        target = path.removeprefix("text_model.")
        config["rank_pattern"][re.escape(target)] = lora.rank(layer)
        config["alpha_pattern"][re.escape(target)] = lora.alpha(layer)
        config["target_modules"].append(target)
    packed = {}
    for model, config in configs.items():
        packed.update({f"{model}.{key}": value for key, value in config.items()})
        packed[f"{model}.r"] = lora.common_rank()
        packed[f"{model}.lora_alpha"] = lora.common_alpha()
        packed[f"{model}.use_dora"] = lora.algo() == "dora"
    metadata = {**lora.metadata, "format": "pt", "lora_adapter_metadata": json.dumps(packed, sort_keys=True)}
    return tensors, metadata
