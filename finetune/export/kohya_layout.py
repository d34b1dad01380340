"""Adapters in the kohya / LyCORIS file layout, which A1111 and ComfyUI load natively.

One entry per adapted layer, named `lora_unet_<module path with . → _>` (`lora_te_…`, or `lora_te1_…` /
`lora_te2_…` for SDXL's two text encoders), holding that algorithm's tensors:
  LoRA, LoCon   `lora_down.weight`, `lora_up.weight`, `alpha`
  DoRA          the same plus `dora_scale` (the learned magnitude, one per output channel)
  LoHa          `hada_w1_a`, `hada_w1_b`, `hada_w2_a`, `hada_w2_b`, `alpha`
  LoKr          `lokr_w1` or `lokr_w1_a`/`lokr_w1_b`, `lokr_w2` or `lokr_w2_a`/`lokr_w2_b`, `alpha`
Readers scale a low-rank product by alpha / rank. peft's tensors have the same names and shapes, so a
layer's tensors are copied as they are; the one difference is LoKr with no low-rank factor, where
readers apply no scale at all, so peft's alpha / rank is multiplied into `lokr_w1`.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
from peft.tuners.loha import LoHaLayer
from peft.tuners.lokr import LoKrLayer
from peft.tuners.lora import LoraLayer

ADAPTER_NAME = "default"
KOHYA_PREFIXES = {"unet": "lora_unet", "text_encoder": "lora_te", "text_encoder_2": "lora_te2"}
LAYER_TYPES = (LoraLayer, LoHaLayer, LoKrLayer)


def kohya_state_dict(
    models: list[tuple[str, torch.nn.Module]],
    *,
    adapter_name: str = ADAPTER_NAME,
    dtype: torch.dtype | None = None,
) -> dict[str, torch.Tensor]:
    """The adapters of (diffusers prefix, model) pairs in the kohya / LyCORIS layout."""
    sdxl = any(prefix == "text_encoder_2" for prefix, _ in models)
    out: dict[str, torch.Tensor] = {}
    for diffusers_prefix, model in models:
        prefix = (
            "lora_te1" if sdxl and diffusers_prefix == "text_encoder" else KOHYA_PREFIXES[diffusers_prefix]
        )
        config = model.peft_config[adapter_name]
        if getattr(config, "lora_bias", False):
            raise ValueError("the kohya layout has no place for lora_bias")
        rslora = getattr(config, "use_rslora", False)
        for path, layer in adapted_layers(model, adapter_name):
            name = f"{prefix}_{classic_path(model, path).replace('.', '_')}"
            for suffix, tensor in layer_tensors(layer, adapter_name, rslora=rslora).items():
                # `alpha` stays a 0-dim float32 whatever the weights' dtype, as kohya writes it.
                out[f"{name}.{suffix}"] = tensor if suffix == "alpha" else prepare_tensor(tensor, dtype)
    if not any(key.startswith("lora_unet_") for key in out):
        raise ValueError(f"the U-Net has no adapter {adapter_name!r} to export")
    return out


def adapted_layers(model: torch.nn.Module, adapter_name: str) -> Iterator[tuple[str, torch.nn.Module]]:
    """(module path, peft layer) for each layer that holds the adapter."""
    for path, module in model.named_modules():
        if isinstance(module, LAYER_TYPES) and adapter_name in module.r:
            yield path.removeprefix("base_model.model."), module  # a PeftModel wrapper adds this prefix


def layer_rank_alpha(layer: torch.nn.Module, adapter_name: str) -> tuple[int, float]:
    """A peft layer's rank and alpha (LoRA keeps alpha as `lora_alpha`, LoHa and LoKr as `alpha`)."""
    alphas = layer.lora_alpha if isinstance(layer, LoraLayer) else layer.alpha
    return layer.r[adapter_name], float(alphas[adapter_name])


def layer_tensors(
    layer: torch.nn.Module, adapter_name: str, *, rslora: bool = False
) -> dict[str, torch.Tensor]:
    """One layer's tensors under their kohya / LyCORIS names (without the layer's prefix)."""
    if isinstance(layer, LoHaLayer):
        names = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")
        if adapter_name in layer.hada_t1:
            raise ValueError("LoHa with effective conv2d (Tucker) is not exported")
        tensors = {name: getattr(layer, name)[adapter_name] for name in names}
        return {**tensors, "alpha": _scalar(layer.alpha[adapter_name])}
    if isinstance(layer, LoKrLayer):
        return _lokr_tensors(layer, adapter_name)
    if adapter_name not in layer.lora_A:  # e.g. an nn.Embedding adapter: no kohya equivalent
        raise ValueError(f"cannot export LoRA on {type(layer).__name__} to the kohya layout")
    rank = layer.r[adapter_name]
    # kohya scales by alpha / rank; rsLoRA scales by alpha / sqrt(rank): store the equivalent.
    alpha = layer.lora_alpha[adapter_name] * (math.sqrt(rank) if rslora else 1.0)
    down, up = layer.lora_A[adapter_name].weight, layer.lora_B[adapter_name].weight
    tensors = {"lora_down.weight": down, "lora_up.weight": up, "alpha": _scalar(alpha)}
    magnitude = getattr(layer, "lora_magnitude_vector", {})
    if adapter_name in magnitude:
        base = layer.get_base_layer().weight
        # One value per output channel, shaped (out, 1, …) like the weight: LyCORIS's `dora_scale`.
        tensors["dora_scale"] = magnitude[adapter_name].weight.reshape(base.shape[0], *[1] * (base.dim() - 1))
    return tensors


def _lokr_tensors(layer: LoKrLayer, adapter_name: str) -> dict[str, torch.Tensor]:
    present = {
        name: getattr(layer, name)[adapter_name]
        for name in ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")
        if adapter_name in getattr(layer, name)
    }
    if "lokr_t2" in present:
        raise ValueError("LoKr with effective conv2d (Tucker) is not exported")
    alpha = float(layer.alpha[adapter_name])
    if "lokr_w1_a" not in present and "lokr_w2_a" not in present:
        # Readers apply alpha / rank only to a low-rank factor; with none, fold peft's scale into w1.
        present["lokr_w1"] = present["lokr_w1"] * layer.scaling[adapter_name]
    return {**present, "alpha": _scalar(alpha)}


def classic_path(model: torch.nn.Module, path: str) -> str:
    """Module path as in the classic CLIPTextModel layout (`text_model.encoder…`).

    transformers 5 flattened CLIPTextModel (no `.text_model`), but kohya, A1111, ComfyUI and older
    diffusers all name text-encoder LoRA keys from the classic layout.
    """
    flat_clip = not hasattr(model, "text_model") and all(hasattr(model, a) for a in ("encoder", "embeddings"))
    if flat_clip and not path.startswith("text_projection"):
        return f"text_model.{path}"
    return path


def _scalar(value: float) -> torch.Tensor:
    return torch.tensor(float(value), dtype=torch.float32)


def prepare_tensor(tensor: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    tensor = tensor.detach().to("cpu")
    return (tensor if dtype is None else tensor.to(dtype)).contiguous()
