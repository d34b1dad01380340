"""The reference loop: plain PyTorch, the way diffusers' example scripts train.

As `examples/text_to_image/train_text_to_image_lora.py` (and `..._lora_sdxl.py`,
`examples/controlnet/train_controlnet.py`) do: a torchvision-transformed image dataset tokenized on
access; every step encodes the images with the VAE and the captions with the text encoder(s) (no
caching), adds DDPM noise, predicts it with the U-Net (LoRA on `to_q/k/v/out.0` through
`unet.add_adapter(LoraConfig)`, or a ControlNet made from the U-Net), takes the MSE loss, reads the
loss back for logging, clips gradients to norm 1 and steps `torch.optim.AdamW`. Frozen weights are
cast to the run's dtype and, as accelerate does, the trained model runs under autocast.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from bench_measure import RunStats, StepClock, count_flops, peak_memory, reset_peak_memory
from diffusers import AutoencoderKL, ControlNetModel, DDPMScheduler, UNet2DConditionModel
from diffusers.optimization import get_scheduler
from peft import LoraConfig
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from finetune.training.methods.controlnet import embedding_channels

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


@dataclass
class ReferenceSetup:
    """What the reference trains: a diffusers folder, the data and the knobs shared with our run."""

    model_dir: Path
    data_dir: Path
    resolution: int
    batch_size: int
    method: str  # lora | controlnet
    rank: int
    device: str
    bf16: bool
    workers: int = 0
    gradient_checkpointing: bool = False
    seed: int = 0


class ReferenceImages(Dataset):
    """Image + caption files, resized, center-cropped, flipped at random, tokenized (and canny edges)."""

    def __init__(self, folder: Path, resolution: int, tokenizers: list[Any], canny: bool) -> None:
        self.files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        if not self.files:
            raise SystemExit(f"no images in {folder}")
        self.tokenizers, self.canny = tokenizers, canny
        self.fit = transforms.Compose(
            [
                transforms.Resize(resolution, interpolation=transforms.InterpolationMode.BILINEAR),
                transforms.CenterCrop(resolution),
            ]
        )
        self.to_tensor = transforms.Compose([transforms.ToTensor(), transforms.Normalize([0.5], [0.5])])

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        path = self.files[index]
        caption_file = path.with_suffix(".txt")
        caption = caption_file.read_text().strip() if caption_file.is_file() else ""
        image = self.fit(Image.open(path).convert("RGB"))
        if random.random() < 0.5:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        ids = [
            tok(caption, max_length=tok.model_max_length, padding="max_length", truncation=True).input_ids
            for tok in self.tokenizers
        ]
        item = {"pixel_values": self.to_tensor(image), "input_ids": torch.tensor(ids)}
        if self.canny:
            item["conditioning_pixel_values"] = transforms.functional.to_tensor(canny_edges(image))
        return item


def canny_edges(image: Image.Image) -> Image.Image:
    import cv2

    edges = cv2.Canny(np.asarray(image.convert("L")), 100, 200)
    return Image.fromarray(np.stack([edges] * 3, axis=-1))


@dataclass
class Parts:
    """The loaded models, on the device, and what trains."""

    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text_encoders: list[torch.nn.Module]
    tokenizers: list[Any]
    scheduler: DDPMScheduler
    weight_dtype: torch.dtype
    controlnet: ControlNetModel | None = None
    trainable: list[torch.nn.Parameter] = field(default_factory=list)

    @property
    def sdxl(self) -> bool:
        return len(self.text_encoders) == 2


def load_parts(setup: ReferenceSetup) -> Parts:
    """Load from the folder in float32, freeze, cast to the run's dtype, attach what trains."""
    folder, device = setup.model_dir, setup.device
    weight_dtype = torch.bfloat16 if setup.bf16 else torch.float32
    sdxl = (folder / "text_encoder_2").is_dir()
    tokenizers = [CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer")]
    encoders: list[torch.nn.Module] = [CLIPTextModel.from_pretrained(folder, subfolder="text_encoder")]
    if sdxl:
        tokenizers.append(CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer_2"))
        encoders.append(CLIPTextModelWithProjection.from_pretrained(folder, subfolder="text_encoder_2"))
    vae = AutoencoderKL.from_pretrained(folder, subfolder="vae")
    unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet")
    scheduler = DDPMScheduler.from_pretrained(folder, subfolder="scheduler")
    for model in (unet, vae, *encoders):
        model.requires_grad_(False)
    if setup.gradient_checkpointing:  # the scripts' --gradient_checkpointing
        unet.enable_gradient_checkpointing()
    controlnet = None
    if setup.method == "controlnet":  # made from the float32 U-Net; trains in float32
        factor = 2 ** (len(vae.config.block_out_channels) - 1)
        channels = embedding_channels(factor)
        controlnet = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=channels)
        if setup.gradient_checkpointing:
            controlnet.enable_gradient_checkpointing()
        controlnet.to(device).train()
    # The SDXL script keeps its VAE in float32 (it overflows in half precision); the SD one casts it.
    vae.to(device, dtype=torch.float32 if sdxl else weight_dtype)
    unet.to(device, dtype=weight_dtype)
    for encoder in encoders:
        encoder.to(device, dtype=weight_dtype)
    parts = Parts(unet, vae, encoders, tokenizers, scheduler, weight_dtype, controlnet)
    if controlnet is not None:
        parts.trainable = list(controlnet.parameters())
    else:
        unet.add_adapter(
            LoraConfig(
                r=setup.rank,
                lora_alpha=setup.rank,
                init_lora_weights="gaussian",
                target_modules=["to_k", "to_q", "to_v", "to_out.0"],
            )
        )
        # The script upcasts LoRA weights to float32 under fp16 only; under bf16 they stay bf16.
        parts.trainable = [p for p in unet.parameters() if p.requires_grad]
    return parts


StepInputs = tuple[torch.Tensor, torch.Tensor, dict, torch.Tensor | None]


def encode(parts: Parts, batch: dict[str, torch.Tensor]) -> StepInputs:
    """(scaled latents, text features, SDXL's added conditions, ControlNet image), without gradients."""
    control = batch.get("conditioning_pixel_values")
    control = control.to(parts.weight_dtype) if control is not None else None
    with torch.no_grad():
        pixels = batch["pixel_values"].to(parts.vae.dtype)
        latents = parts.vae.encode(pixels).latent_dist.sample() * parts.vae.config.scaling_factor
        latents = latents.to(parts.weight_dtype)
        ids = batch["input_ids"]
        if not parts.sdxl:
            return latents, parts.text_encoders[0](ids[:, 0], return_dict=False)[0], {}, control
        hidden, pooled = [], None
        for index, encoder in enumerate(parts.text_encoders):
            output = encoder(ids[:, index], output_hidden_states=True, return_dict=False)
            pooled, states = output[0], output[-1]
            hidden.append(states[-2])  # SDXL conditions on the penultimate layer of both encoders
        size = latents.shape[-1] * 2 ** (len(parts.vae.config.block_out_channels) - 1)
        # original size, crop top-left, target size: values do not change the cost
        time_ids = torch.tensor([size, size, 0, 0, size, size], device=latents.device).repeat(len(latents), 1)
        added = {"text_embeds": pooled, "time_ids": time_ids.to(parts.weight_dtype)}
        return latents, torch.cat(hidden, dim=-1), added, control


def denoising_loss(parts: Parts, inputs: StepInputs, autocast: AbstractContextManager) -> torch.Tensor:
    """Noise, predict it, MSE: the part of the step whose FLOPs are counted."""
    latents, text, added, control = inputs
    noise = torch.randn_like(latents)
    steps = parts.scheduler.config.num_train_timesteps
    timesteps = torch.randint(0, steps, (latents.shape[0],), device=latents.device).long()
    noisy = parts.scheduler.add_noise(latents, noise, timesteps)
    residuals: dict[str, Any] = {}
    kwargs = {"added_cond_kwargs": added} if added else {}
    with autocast:
        if parts.controlnet is not None:
            down, mid = parts.controlnet(
                noisy, timesteps, text, controlnet_cond=control, return_dict=False, **kwargs
            )
            residuals = {
                "down_block_additional_residuals": [r.to(parts.weight_dtype) for r in down],
                "mid_block_additional_residual": mid.to(parts.weight_dtype),
            }
        prediction = parts.unet(noisy, timesteps, text, return_dict=False, **residuals, **kwargs)[0]
    return F.mse_loss(prediction.float(), noise.float(), reduction="mean")


def batches(loader: DataLoader, device: str) -> Iterator[dict[str, torch.Tensor]]:
    """Epoch after epoch, on the device."""
    while True:
        for batch in loader:
            yield {key: value.to(device) for key, value in batch.items()}


def run_reference(setup: ReferenceSetup, warmup: int, steps: int) -> tuple[RunStats, int]:
    """Train `warmup + steps` steps; returns the timings and the U-Net step's FLOPs per image."""
    random.seed(setup.seed)
    torch.manual_seed(setup.seed)
    start_memory = reset_peak_memory(setup.device)
    clock = StepClock(setup.device, warmup)
    parts = load_parts(setup)
    data = ReferenceImages(setup.data_dir, setup.resolution, parts.tokenizers, setup.method == "controlnet")
    loader = DataLoader(data, batch_size=setup.batch_size, shuffle=True, num_workers=setup.workers)
    optimizer = torch.optim.AdamW(parts.trainable, lr=1e-4, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)
    lr_scheduler = get_scheduler("constant", optimizer)
    autocast = torch.autocast(setup.device, dtype=torch.bfloat16) if setup.bf16 else nullcontext()
    stream = batches(loader, setup.device)
    for _ in range(warmup + steps):
        loss = denoising_loss(parts, encode(parts, next(stream)), autocast)
        loss.item()  # the scripts log the loss every step, which waits for the device
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parts.trainable, 1.0)
        optimizer.step()
        lr_scheduler.step()
        optimizer.zero_grad()
        clock.tick()
    peak = peak_memory(setup.device)
    stats = RunStats.from_clock("reference", setup.batch_size, clock, start_memory, peak)
    return stats, unet_step_flops(parts, next(stream), autocast, setup.device)


def unet_step_flops(parts: Parts, batch: dict, autocast: AbstractContextManager, device: str) -> int:
    """FLOPs per image of one forward + backward of the denoiser (VAE and text encoders not counted)."""
    inputs = encode(parts, batch)

    def step() -> None:
        denoising_loss(parts, inputs, autocast).backward()

    flops = count_flops(step, device)
    for parameter in parts.trainable:
        parameter.grad = None
    return flops // len(inputs[0])
