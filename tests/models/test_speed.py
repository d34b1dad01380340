"""Speed settings: optimizers by name, attention kernels, channels-last and compile, as config keys."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import compose_config, fast_overrides
from omegaconf import OmegaConf

from finetune.config.errors import ConfigError
from finetune.config.schema import OptimConfig
from finetune.train import train
from finetune.training.optimizers import build_optimizer


def _parameters() -> list[dict]:
    return [{"params": list(torch.nn.Linear(4, 4).parameters())}]


def test_adamw_is_fused_only_when_asked_or_on_cuda() -> None:
    cfg = OmegaConf.structured(OptimConfig)
    assert build_optimizer(cfg, _parameters()).defaults["fused"] is False  # CPU parameters
    cfg.fused = True
    assert build_optimizer(cfg, _parameters()).defaults["fused"] is True


def test_adafactor_comes_from_transformers_with_our_learning_rate() -> None:
    from transformers.optimization import Adafactor

    cfg = OmegaConf.structured(OptimConfig(name="adafactor", lr=3e-4))
    optimizer = build_optimizer(cfg, _parameters())
    assert isinstance(optimizer, Adafactor) and optimizer.defaults["lr"] == 3e-4
    assert optimizer.defaults["relative_step"] is False


def test_unknown_choices_given_in_code_are_one_line_errors() -> None:
    """Composed configs refuse them earlier (tests/config); code that builds its own still gets one line."""
    from finetune.models.speed import set_attention
    from finetune.training.optimizers import check_optimizer

    with pytest.raises(
        ConfigError, match="optim.name: 'lion' is not one of adamw, adamw_8bit, adafactor, prodigy"
    ):
        check_optimizer("lion")
    with pytest.raises(ConfigError, match="model.attention: 'flash' is not one of sdpa, xformers, eager"):
        set_attention(torch.nn.Linear(1, 1), "flash")


def test_a_missing_optional_optimizer_package_is_named(tmp_path: Path, monkeypatch) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name: None if name == "prodigyopt" else real(name)
    )
    cfg = compose_config(fast_overrides(tmp_path / "never", tmp_path / "run") + ["optim.name=prodigy"])
    with pytest.raises(ConfigError, match="pip install prodigyopt"):
        train(cfg)


@pytest.mark.slow
def test_eager_attention_channels_last_and_adafactor_train(tiny_model: Path, tmp_path: Path) -> None:
    overrides = fast_overrides(tiny_model, tmp_path / "run", steps=2) + [
        "model.attention=eager",
        "model.channels_last=true",
        "optim.name=adafactor",
        "optim.lr=1e-3",
        "validation.every_n_steps=0",
    ]
    run = train(compose_config(overrides))
    unet = run.module.unet
    processors = {type(p).__name__ for p in unet.attn_processors.values()}
    assert processors == {"AttnProcessor"}
    conv = unet.conv_in.weight
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    lora_b = [p for n, p in unet.named_parameters() if "lora_B" in n]
    assert any(p.abs().sum() > 0 for p in lora_b)  # zero-initialised, so non-zero means it trained
    assert (run.run_dir / "adapter" / "pytorch_lora_weights.safetensors").is_file()


def test_compile_auto_is_on_for_long_gpu_runs_only() -> None:
    from finetune.models.speed import AUTO_COMPILE_STEPS, compiles

    assert compiles("auto", on_cuda=True, max_steps=AUTO_COMPILE_STEPS)
    assert compiles("auto", on_cuda=True, max_steps=-1)  # no step limit: epochs
    assert not compiles("auto", on_cuda=True, max_steps=AUTO_COMPILE_STEPS - 1)
    assert not compiles("auto", on_cuda=False, max_steps=10_000)
    assert not compiles("auto", on_cuda=True, max_steps=10_000, sharded=True)
    assert compiles(True, on_cuda=False, max_steps=1) and not compiles(False, on_cuda=True, max_steps=10_000)


def _recording_compile(monkeypatch, backend: str | None = None) -> list[torch.nn.Module]:
    """Make nn.Module.compile record each module it is called on (and compile with `backend`, or not
    at all when None)."""
    compiled: list[torch.nn.Module] = []
    original = torch.nn.Module.compile

    def record(self, *args, **kwargs) -> None:
        compiled.append(self)
        if backend is not None:
            original(self, *args, backend=backend, **kwargs)

    monkeypatch.setattr(torch.nn.Module, "compile", record)
    return compiled


def test_compile_scope_full_compiles_the_whole_denoiser(tiny_model: Path, monkeypatch) -> None:
    from diffusers import UNet2DConditionModel

    from finetune.models.speed import compile_denoiser

    compiled = _recording_compile(monkeypatch)
    unet = UNet2DConditionModel.from_pretrained(tiny_model, subfolder="unet")
    compile_denoiser(unet, "full")
    assert compiled == [unet]
    compiled.clear()
    plain = torch.nn.Sequential(torch.nn.Conv2d(4, 4, 3))  # no transformer blocks: compiled whole
    compile_denoiser(plain, "blocks")
    assert compiled == [plain]


@pytest.mark.slow
def test_compile_true_compiles_each_transformer_block_and_trains_through_them(
    tiny_model: Path, tmp_path: Path, monkeypatch
) -> None:
    """The default scope (regional compilation): every transformer block compiled, the U-Net itself
    not. Dynamo's aot_eager backend traces the same forward and backward graphs inductor would get,
    without inductor's C++ code generation (a minute or more on a CPU)."""
    import safetensors.torch
    from diffusers.models.attention import BasicTransformerBlock
    from torch._dynamo.utils import counters

    compiled = _recording_compile(monkeypatch, backend="aot_eager")
    torch._dynamo.reset()
    counters.clear()
    overrides = fast_overrides(tiny_model, tmp_path / "run", steps=2)
    run = train(compose_config(overrides + ["model.compile=true", "validation.every_n_steps=0"]))
    unet = run.module.unet
    blocks = [m for m in unet.modules() if isinstance(m, BasicTransformerBlock)]
    assert len(blocks) > 1 and compiled == blocks
    assert counters["stats"]["unique_graphs"] >= 2  # blocks of two widths: traced, not skipped
    lora_b = [p for n, p in unet.named_parameters() if "lora_B" in n]
    assert lora_b and all(p.abs().sum() > 0 for p in lora_b)  # zero-initialised: all trained
    exported = safetensors.torch.load_file(run.run_dir / "adapter" / "pytorch_lora_weights.safetensors")
    assert len(exported) == 2 * len(lora_b) and not any("_orig_mod" in key for key in exported)


def test_compiled_blocks_of_four_widths_stay_compiled_through_training_sampling_and_new_buckets(
    monkeypatch,
) -> None:
    """Every block shares one forward; its compiles for each width, with and without gradients and at
    new bucket shapes would pass dynamo's default limit (8), past which blocks silently run eager."""
    from diffusers import UNet2DConditionModel
    from torch._dynamo.utils import counters

    from finetune.models.speed import compile_denoiser

    _recording_compile(monkeypatch, backend="eager")  # dynamo's tracing and guards, no code generation
    monkeypatch.setattr(torch._dynamo.config, "cache_size_limit", 8)  # dynamo's default
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64, 96, 128),
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        layers_per_block=1,
        cross_attention_dim=16,
        attention_head_dim=8,
        sample_size=16,
    )
    unet.requires_grad_(False)
    for name, parameter in unet.named_parameters():  # what trains, as LoRA's layers sit: in the attention
        parameter.requires_grad_(name.endswith("attn1.to_q.weight"))
    torch._dynamo.reset()
    counters.clear()
    compile_denoiser(unet, "blocks")
    for height, width, grad in [
        (16, 16, True),
        (16, 16, False),
        (16, 24, True),
        (24, 16, True),
        (16, 24, False),
    ]:
        with torch.set_grad_enabled(grad):
            out = unet(torch.randn(1, 4, height, width), 10, torch.randn(1, 77, 16)).sample
            if grad:
                out.mean().backward()
    frames = counters["frames"]
    assert frames["total"] > 8 and frames["ok"] == frames["total"]  # each compile happened, none refused
