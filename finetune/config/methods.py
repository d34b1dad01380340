"""Typed schemas of the `method` group: the LoRA family, full fine-tuning, ControlNet."""

from __future__ import annotations

from dataclasses import dataclass, field

from finetune.config.schema import Choice


class LoraAlgo(Choice):
    lora = "lora"  # low-rank A·B beside each targeted linear layer
    locon = "locon"  # LoRA on the U-Net's convolutions too (conv_rank, conv_alpha)
    loha = "loha"  # the Hadamard product of two low-rank products (LyCORIS LoHa)
    lokr = "lokr"  # a Kronecker product of two small factors (LyCORIS LoKr)
    dora = "dora"  # LoRA for the direction, plus a learned magnitude per output channel


@dataclass
class LoraMethodConfig:
    """The LoRA family through peft (`method=lora`, `method.algo=lora|locon|loha|lokr|dora`)."""

    name: str = "lora"
    algo: LoraAlgo = LoraAlgo.lora
    rank: int = 8
    alpha: float | None = None  # null: alpha = rank (scale 1.0)
    # The U-Net's ResNet and sampler convolutions: null trains them at `rank` for locon, and not at all
    # for the others; a number trains them at that rank with any algo.
    conv_rank: int | None = None
    conv_alpha: float | None = None  # null: conv_rank
    dropout: float = 0.0  # lora, locon, dora: dropout on the adapter's input
    rank_dropout: float = 0.0  # loha, lokr: drop rank components while training
    module_dropout: float = 0.0  # loha, lokr: skip a layer's adapter for a step with this probability
    lokr_factor: int = -1  # lokr: the first Kronecker factor's size; -1: as square as the shape allows
    lokr_decompose_both: bool = False  # lokr: the first factor low-rank too (fewer weights)
    target_modules: list[str] = field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"])
    train_text_encoder: bool = False
    text_encoder_target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "out_proj"]
    )
    init_weights: str = "gaussian"  # lora, locon, dora (peft's init_lora_weights)
    # Continue from an existing LoRA file (diffusers or kohya layout); its rank and alpha win.
    init_from: str | None = None


@dataclass
class FullMethodConfig:
    """Full U-Net fine-tuning (`method=full`), with an exponential moving average of the weights."""

    name: str = "full"
    ema: bool = True
    ema_decay: float = 0.9999  # the ceiling; with warmup the decay starts low and rises towards it
    ema_warmup: bool = True
    ema_power: float = 0.6666667  # warmup: decay = 1 - (1 + step) ** -power
    save_single_file: bool = True  # also write model.safetensors in the original (A1111/ComfyUI) layout


@dataclass
class ControlNetMethodConfig:
    """A ControlNet beside the frozen base U-Net (`method=controlnet`)."""

    name: str = "controlnet"
    # null: initialise from the base U-Net's encoder; else a hub id, folder or single file to continue.
    pretrained: str | None = None
    pretrained_config: str | None = None  # a single file's architecture: a folder with its config.json
    conditioning_scale: float = 1.0
    lora_rank: int | None = None  # train a LoRA on the ControlNet instead of all its weights
    unet_lora_rank: int | None = None  # also train a LoRA on the base U-Net
    lora_target_modules: list[str] = field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"])
    save_single_file: bool = True  # also write controlnet.safetensors in the original (A1111/ComfyUI) layout
