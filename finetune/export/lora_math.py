"""Weight changes of LoRA-family layers, and low-rank pairs that approximate them (SVD).

A layer's change is handled as a matrix of (out channels, everything else): a linear layer's weight
shape, or a convolution's weight with its kernel flattened. The formulas are the ones every reader of
these files applies (kohya, LyCORIS, ComfyUI, A1111): a low-rank product is scaled by alpha / rank;
a LoKr layer whose factors are whole matrices is not scaled.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from finetune.config.errors import ConfigError


def layer_delta(tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    """The weight change a layer's tensors encode, as an (out, rest) float32 matrix."""
    t = {name: value.float() for name, value in tensors.items()}
    if "dora_scale" in t:
        raise ConfigError("DoRA layers change the weight by a base-dependent amount; merge them into a model")
    if "lora_down.weight" in t:
        down, up = t["lora_down.weight"], t["lora_up.weight"]
        rank = down.shape[0]
        scale = t["alpha"].item() / rank if "alpha" in t else 1.0
        return (up.reshape(up.shape[0], rank) @ down.reshape(rank, -1)) * scale
    if "hada_w1_a" in t:
        if "hada_t1" in t:
            raise ConfigError("LoHa with Tucker-decomposed convolutions (hada_t1) is not read")
        rank = t["hada_w1_b"].shape[0]
        scale = t["alpha"].item() / rank if "alpha" in t else 1.0
        return (t["hada_w1_a"] @ t["hada_w1_b"]) * (t["hada_w2_a"] @ t["hada_w2_b"]) * scale
    if "lokr_w1" in t or "lokr_w1_a" in t:
        return _kron_delta(t)
    raise ConfigError(f"a layer with tensors {sorted(tensors)} is not one of LoRA, LoCon, LoHa or LoKr")


def _kron_delta(t: dict[str, torch.Tensor]) -> torch.Tensor:
    if "lokr_t2" in t:
        raise ConfigError("LoKr with Tucker-decomposed convolutions (lokr_t2) is not read")
    rank = None
    factors = []
    for name in ("lokr_w1", "lokr_w2"):
        if name in t:
            factors.append(t[name])
        else:
            factors.append(t[f"{name}_a"] @ t[f"{name}_b"])
            rank = t[f"{name}_b"].shape[0]
    first, second = factors
    if second.dim() == 4:
        first = first[:, :, None, None]
    delta = torch.kron(first, second)
    scale = t["alpha"].item() / rank if rank and "alpha" in t else 1.0
    return delta.reshape(delta.shape[0], -1) * scale


@dataclass
class LowRank:
    """A rank-`rank` pair whose product times alpha / rank approximates a change."""

    up: torch.Tensor  # (out, rank)
    down: torch.Tensor  # (rank, rest)
    alpha: float
    kept: float  # share of the change's energy (squared singular values) kept


def low_rank(
    delta: torch.Tensor,
    *,
    rank: int | None = None,
    share: float | None = None,
    scale: float = 1.0,
    max_rank: int | None = None,
) -> LowRank:
    """The best pair of `rank` (or of the fewest ranks keeping `share` of the energy, at most
    `max_rank`) for `delta`. `scale` is the alpha / rank the pair is to be read with."""
    u, s, vh = torch.linalg.svd(delta.float(), full_matrices=False)
    energy = s.square()
    total = float(energy.sum())
    if rank is None:
        if share is None:
            raise ValueError("give a rank or a share of energy to keep")
        kept_so_far = torch.cumsum(energy, 0) / max(total, 1e-30)
        rank = int((kept_so_far < share - 1e-7).sum().item()) + 1
    rank = max(1, min(rank, s.numel(), max_rank or s.numel()))
    root = s[:rank].sqrt() / scale**0.5  # split the singular values between the two sides
    return LowRank(
        up=(u[:, :rank] * root).contiguous(),
        down=(root[:, None] * vh[:rank]).contiguous(),
        alpha=scale * rank,
        kept=float(energy[:rank].sum()) / total if total > 0 else 1.0,
    )


def pair_tensors(pair: LowRank, weight_shape: torch.Size | tuple[int, ...]) -> dict[str, torch.Tensor]:
    """A pair as kohya tensors for a layer whose weight has `weight_shape` (a 4-D one is a conv)."""
    rank = pair.down.shape[0]
    down, up = pair.down, pair.up
    if len(weight_shape) == 4:
        down = down.reshape(rank, *weight_shape[1:])
        up = up.reshape(weight_shape[0], rank, 1, 1)
    return {"lora_down.weight": down, "lora_up.weight": up, "alpha": torch.tensor(float(pair.alpha))}


def kernel_shape(tensors: dict[str, torch.Tensor]) -> tuple[int, ...] | None:
    """The layer's weight shape as its LoRA pair shows it (None for LoHa / LoKr, which do not)."""
    if "lora_down.weight" not in tensors:
        return None
    down, up = tensors["lora_down.weight"], tensors["lora_up.weight"]
    return (up.shape[0], *down.shape[1:])
