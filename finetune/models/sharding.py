"""`trainer=fsdp`: the trained models' weights, gradients and optimizer state sharded across ranks
with PyTorch's FSDP2 (`fully_shard`).

Why FSDP2 and not Lightning's `strategy="fsdp"` (FSDP1): FSDP1 flattens each wrapped block into one
tensor of one dtype, which fails as soon as frozen bf16 base weights and float32 LoRA weights share a
block, and Lightning refuses it on the CPU. FSDP2 shards every parameter on its own, so LoRA,
ControlNet and full training shard alike, on GPUs or on CPU processes (gloo). Lightning runs FSDP2
through its ModelParallelStrategy; `DiffusionModule.configure_model` applies `fully_shard`.

A sharded model's forward pass is a collective (every rank gathers the block it runs), so sampling
runs on every rank (only rank 0 writes), and the export gathers full weights on every rank first.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from torch.distributed.tensor import DTensor

from finetune.config.errors import ConfigError

# Sub-module lists that become one FSDP unit each: the U-Net's and ControlNet's resolution blocks, and a
# CLIP text encoder's layers (transformers 5 dropped the `text_model` level). Each unit's weights are
# gathered only while it runs. A unit per text layer also matters for SDXL, which reads the penultimate
# layer's output: FSDP prepares a unit's backward from the unit's outputs, and that tensor is one.
BLOCK_PATHS = ("down_blocks", "up_blocks", "text_model.encoder.layers", "encoder.layers")
SINGLE_BLOCKS = ("mid_block",)
# A text encoder's remaining weights are sharded at its layer stack, not at the model: fully_shard gives
# a module a new class, and transformers looks up how to collect `output_hidden_states` by the model's.
TEXT_ENCODER_STACKS = ("text_model.encoder", "encoder")


class ShardedDataParallel(ModelParallelStrategy):
    """FSDP2 over every process: data-parallel size = world size, no tensor parallelism.

    Lightning's ModelParallelStrategy would by default make each node a tensor-parallel group; this
    project only shards. Checkpoints are single files assembled on rank 0, so `resume=auto`,
    `checkpoint.keep_last` and the weights-only loading treat them like any other run's.
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(save_distributed_checkpoint=False, **kwargs)

    def setup_environment(self) -> None:
        self._data_parallel_size = self.num_nodes * self.num_processes
        self._tensor_parallel_size = 1
        super().setup_environment()


def shard_models(models: list[torch.nn.Module], mesh: Any) -> None:
    """`fully_shard` each model's blocks, then what holds the rest: the model itself, or a text
    encoder's layer stack (its embeddings and final norm are frozen, so they may stay whole)."""
    from torch.distributed.fsdp import fully_shard

    for model in models:
        for block in _blocks(model):
            fully_shard(block, mesh=mesh)
        stacks = (_get(model, path) for path in TEXT_ENCODER_STACKS)
        fully_shard(next((stack for stack in stacks if stack is not None), model), mesh=mesh)
        outside = [
            name
            for name, parameter in model.named_parameters()
            if parameter.requires_grad and not isinstance(parameter, DTensor)
        ]
        if outside:  # FSDP would not average their gradients across ranks
            raise ConfigError(
                f"trainer=fsdp: {outside[0]} trains outside the sharded layers of "
                f"{type(model).__name__}; train it with trainer=ddp"
            )


def _blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    blocks = []
    for path in BLOCK_PATHS:
        modules = _get(model, path)
        if modules is not None:
            blocks.extend(modules)
    blocks.extend(m for m in (_get(model, path) for path in SINGLE_BLOCKS) if m is not None)
    return blocks


def _get(model: torch.nn.Module, path: str) -> Any:
    for name in path.split("."):
        model = getattr(model, name, None)
        if model is None:
            return None
    return model


def is_sharded(module: torch.nn.Module) -> bool:
    """Whether any of `module`'s weights are sharded across ranks."""
    return any(isinstance(p, DTensor) for p in module.parameters())


def runs_sampling(trainer: Any, module: torch.nn.Module) -> bool:
    """Whether this rank runs the sampler: rank 0, or every rank when the weights are sharded (its
    forward pass gathers weights from all of them). Only rank 0 saves and logs the results."""
    return trainer.is_global_zero or is_sharded(module)


@contextmanager
def full_weights(module: torch.nn.Module) -> Iterator[None]:
    """Every rank must enter: sharded weights become whole tensors (a copy) for the block, e.g. for
    rank 0 to export them; the shards come back after. Does nothing to a module that is not sharded.

    No forward pass may run inside: FSDP would gather into the shards again."""
    from torch.distributed.fsdp import FSDPModule

    swapped: list[tuple[torch.nn.Module, str, torch.nn.Parameter]] = []
    with torch.no_grad():
        for submodule in module.modules():
            if isinstance(submodule, FSDPModule):
                # After a forward pass without backward (sampling) a unit may still hold gathered
                # weights whose memory FSDP frees later; back to shards first, then gather anew.
                submodule.reshard()
        for submodule in module.modules():
            for name, parameter in list(submodule._parameters.items()):
                if isinstance(parameter, DTensor):
                    whole = torch.nn.Parameter(parameter.full_tensor(), parameter.requires_grad)
                    submodule._parameters[name] = whole
                    swapped.append((submodule, name, parameter))
    try:
        yield
    finally:
        for submodule, name, parameter in swapped:
            submodule._parameters[name] = parameter


def gradient_norm(norm: torch.Tensor) -> torch.Tensor:
    """A norm over sharded gradients is a partial value on each rank; this is the whole one."""
    return norm.full_tensor() if isinstance(norm, DTensor) else norm
