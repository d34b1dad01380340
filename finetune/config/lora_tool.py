"""The typed schema of `finetune-lora` (conf/lora_tool.yaml)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from finetune.config.schema import Choice


class LoraCommand(Choice):
    inspect = "inspect"  # what a file holds
    convert = "convert"  # into the other layout
    resize = "resize"  # to a lower rank (SVD)
    merge = "merge"  # into a base model
    combine = "combine"  # several into one
    extract = "extract"  # from the difference of two models


class LoraLayout(Choice):
    kohya = "kohya"  # lora_unet_… (A1111, ComfyUI, kohya, LyCORIS)
    diffusers = "diffusers"  # unet.… (diffusers' load_lora_weights)


@dataclass
class LoraToolConfig:
    command: LoraCommand = LoraCommand.inspect
    file: str | None = None  # inspect, convert, resize: the LoRA file (either layout)
    to: LoraLayout = LoraLayout.kohya  # the layout of the file written
    out: str | None = None  # what to write: never an input, never an existing path
    rank: int | None = None  # resize, combine, extract: the rank of the result
    dynamic: float | None = None  # resize: keep this share of each layer's energy (0-1) instead of a rank
    conv_rank: int | None = None  # extract: the rank on convolutions (default: rank)
    # merge: the base model; convert to=diffusers: the model the file is for. The `model` group, as in
    # finetune-train and finetune-generate: model=sd15, model.pretrained=<hub id, folder or file>.
    model: Any = None
    loras: list[str] = field(default_factory=list)  # merge, combine: [file.safetensors:weight, …]
    base: str | None = None  # extract: the model before
    tuned: str | None = None  # extract: the model after
    min_diff: float = 1e-6  # extract: layers whose weights changed by less (max abs) are left out
