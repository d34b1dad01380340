"""The file commands of `finetune-lora`: inspect, convert, resize, combine, extract.

Each reads LoRA files of either layout (`lora_file.read_lora_file`), writes safetensors with metadata
saying what was done, and never writes over an input or an existing file.
"""

from __future__ import annotations

import re
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch

from finetune.config.errors import ConfigError
from finetune.export.kohya_layout import classic_path
from finetune.export.lora_apply import pipeline_models
from finetune.export.lora_file import LoraFile, check_output, layers_for, read_lora_file, write_lora_file
from finetune.export.lora_math import kernel_shape, layer_delta, low_rank, pair_tensors

# Header keys `inspect` shows as the training facts (ours, then kohya's and the model spec's names).
FACTS = (
    "base_model", "ss_sd_model_name", "ss_base_model_version", "modelspec.architecture", "steps", "ss_steps",
    "resolution", "ss_resolution", "num_train_images", "ss_num_train_images", "learning_rate",
    "ss_learning_rate", "trained_at", "modelspec.date", "init_from",
)  # fmt: skip


def inspect(file: str) -> dict[str, Any]:
    """What a file holds: algorithm, layers, rank and alpha per block, base model, training facts."""
    lora = read_lora_file(file)
    blocks: dict[str, dict[str, set]] = defaultdict(
        lambda: {"layers": set(), "ranks": set(), "alphas": set()}
    )
    for layer in lora.layers:
        block = blocks[block_of(layer)]
        block["layers"].add(layer)
        block["ranks"].add(lora.rank(layer))
        block["alphas"].add(lora.alpha(layer))
    return {
        "file": str(file),
        "layout": lora.layout,
        "algo": lora.algo(),
        "layers": len(lora.layers),
        "keys": sum(len(tensors) for tensors in lora.layers.values()),
        "blocks": {
            name: {k: sorted(v) if k != "layers" else len(v) for k, v in b.items()}
            for name, b in blocks.items()
        },
        "facts": {key: lora.metadata[key] for key in FACTS if key in lora.metadata},
    }


def block_of(layer: str) -> str:
    """A layer's block, for grouping: `unet down_blocks.1`, `unet mid_block`, `text_encoder`, …"""
    prefix, _, rest = layer.partition("_")[2].partition("_")
    model = {"unet": "unet", "te": "text_encoder", "te1": "text_encoder", "te2": "text_encoder_2"}.get(
        prefix, prefix
    )
    match = re.match(r"((?:down|up)_blocks_\d+|mid_block)", rest)
    return f"{model} {match.group(1).replace('_blocks_', '_blocks.')}" if match else model


def convert(file: str, to: str, out: str, pipe: Any = None) -> Path:
    """The file in the other layout. To diffusers, `pipe` (the base pipeline) names each layer's module."""
    lora = read_lora_file(file)
    target = check_output(out, [file])
    paths = module_paths(lora, pipe) if to == "diffusers" else None
    metadata = {k: v for k, v in lora.metadata.items() if k not in ("format", "lora_adapter_metadata")}
    converted = LoraFile(lora.layers, {**metadata, "converted_from": Path(file).name}, lora.layout)
    return write_lora_file(converted, target, layout=str(to), module_paths=paths)


def module_paths(lora: LoraFile, pipe: Any) -> dict[str, str]:
    """{kohya layer name: module path} for every layer of the file, read from the base pipeline."""
    if pipe is None:
        raise ConfigError(
            "model: to=diffusers needs the base model the file was trained on (its layer names)"
        )
    paths: dict[str, str] = {}
    for prefix, module in pipeline_models(
        pipe
    ):  # diffusers files name text-encoder layers in the classic CLIP layout
        found = layers_for(lora, module, prefix, key="model")
        paths.update({name: classic_path(module, path) for name, path in found.items()})
    missing = sorted(set(lora.layers) - set(paths))
    if missing:
        raise ConfigError(f"model: {len(missing)} layers of the file are not in it (e.g. {missing[0]})")
    return paths


def resize(file: str, out: str, rank: int | None = None, dynamic: float | None = None) -> dict[str, Any]:
    """Each layer at `rank` (or at the fewest ranks keeping `dynamic` of its energy), by SVD."""
    if (rank is None) == (dynamic is None):
        raise ConfigError("resize: give rank=N or dynamic=<share of energy kept>, one of them")
    if dynamic is not None and not 0 < dynamic <= 1:
        raise ConfigError(f"dynamic: {dynamic} must be above 0 and at most 1")
    lora = read_lora_file(file)
    _pairs_only(lora, "resize")
    target = check_output(out, [file])
    layers, kept = {}, {}
    for name, tensors in lora.layers.items():
        old_rank = lora.rank(name)
        scale = lora.alpha(name) / old_rank  # the ratio readers apply stays the file's
        pair = low_rank(layer_delta(tensors), rank=rank, share=dynamic, scale=scale, max_rank=old_rank)
        layers[name] = pair_tensors(pair, kernel_shape(tensors))
        kept[name] = (old_rank, pair.down.shape[0], pair.kept)
    resized = LoraFile(layers, {**lora.metadata, "resized_from": Path(file).name}, "kohya")
    write_lora_file(resized, target, layout="kohya")
    return {"out": str(target), "layers": kept}


def combine(loras: list[tuple[str, float]], rank: int, out: str) -> dict[str, Any]:
    """The weighted sum of several LoRAs' changes, as one LoRA of `rank` (SVD per layer)."""
    if rank is None or rank < 1:
        raise ConfigError("rank: combine needs the rank of the result, at least 1")
    files = [(read_lora_file(path), weight) for path, weight in loras]
    target = check_output(out, [path for path, _ in loras])
    sums: dict[str, torch.Tensor] = {}
    shapes: dict[str, tuple[int, ...]] = {}
    for lora, weight in files:
        _pairs_only(lora, "combine")
        for name, tensors in lora.layers.items():
            delta = layer_delta(tensors) * weight
            sums[name] = sums[name] + delta if name in sums else delta
            shapes[name] = kernel_shape(tensors)
    layers, kept = {}, {}
    for name, delta in sums.items():
        pair = low_rank(delta, rank=rank)
        layers[name], kept[name] = pair_tensors(pair, shapes[name]), pair.kept
    sources = ",".join(f"{Path(path).name}:{weight}" for path, weight in loras)
    metadata = {"combined_from": sources, "ss_network_dim": str(rank), "ss_network_alpha": str(float(rank))}
    write_lora_file(LoraFile(layers, metadata, "kohya"), target, layout="kohya")
    return {"out": str(target), "layers": kept}


def extract(
    base: Any,
    tuned: Any,
    rank: int,
    out: Path,
    to: str = "kohya",
    *,
    conv_rank: int | None = None,
    min_diff: float = 1e-6,
) -> dict[str, Any]:
    """A LoRA of `rank` from the difference between two pipelines, written to `out` (checked by the
    caller): their U-Net's and text encoders' attention, feed-forward and ResNet layers, the layers
    kohya's LoRA and LoCon adapt; a layer that changed by at most `min_diff` is left out."""
    layers: dict[str, dict[str, torch.Tensor]] = {}
    paths: dict[str, str] = {}
    kept: dict[str, float] = {}
    for prefix, before, after in _model_pairs(base, tuned):
        tuned_modules = dict(after.named_modules())
        for path, module in before.named_modules():
            if not isinstance(module, torch.nn.Linear | torch.nn.Conv2d) or not _extracted(prefix, path):
                continue
            delta = tuned_modules[path].weight.detach().float() - module.weight.detach().float()
            if delta.abs().max() <= min_diff:
                continue
            is_conv3 = delta.dim() == 4 and delta.shape[-1] > 1
            pair = low_rank(delta.reshape(delta.shape[0], -1), rank=(conv_rank or rank) if is_conv3 else rank)
            name = f"{prefix}_{classic_path(before, path).replace('.', '_')}"
            layers[name], kept[name] = pair_tensors(pair, delta.shape), pair.kept
            paths[name] = classic_path(before, path)
    if not layers:
        raise ConfigError(f"base and tuned do not differ by more than min_diff={min_diff} anywhere")
    metadata = {"ss_network_dim": str(rank), "ss_network_alpha": str(float(rank)), "extracted": "true"}
    write_lora_file(LoraFile(layers, metadata, "kohya"), out, layout=str(to), module_paths=paths)
    return {"out": str(out), "layers": kept}


def _model_pairs(base: Any, tuned: Any) -> list[tuple[str, torch.nn.Module, torch.nn.Module]]:
    sdxl = getattr(base, "text_encoder_2", None) is not None
    pairs = [
        ("lora_unet", base.unet, tuned.unet),
        ("lora_te1" if sdxl else "lora_te", base.text_encoder, tuned.text_encoder),
    ]
    if sdxl:
        pairs.append(("lora_te2", base.text_encoder_2, tuned.text_encoder_2))
    return pairs


def _extracted(prefix: str, path: str) -> bool:
    if prefix == "lora_unet":
        return path.startswith(("down_blocks.", "mid_block.", "up_blocks."))
    return ".layers." in f".{path}"


def _pairs_only(lora: LoraFile, command: str) -> None:
    if lora.algo() != "lora":
        raise ConfigError(f"{command}: reads LoRA and LoCon files; this one is {lora.algo()}")


def parse_weighted(entries: list[str]) -> list[tuple[str, float]]:
    """`["a.safetensors:0.8", "b.safetensors"]` -> [("a.safetensors", 0.8), ("b.safetensors", 1.0)]."""
    parsed = []
    for entry in entries:
        path, _, weight = (
            str(entry).rpartition(":") if re.search(r":-?[\d.]+$", str(entry)) else (entry, "", "1")
        )
        try:
            parsed.append((path, float(weight)))
        except ValueError:
            raise ConfigError(f"loras: '{entry}' is not <file.safetensors>[:<weight>]") from None
    if not parsed:
        raise ConfigError("loras: give at least one file, e.g. loras=[a.safetensors:0.8,b.safetensors:0.5]")
    return parsed
