"""`finetune-lora`: inspect, convert, resize, merge, combine and extract, on LoRA files of the tiny model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import REPO, run_module
from diffusers import StableDiffusionPipeline
from hydra import compose, initialize_config_dir
from safetensors import safe_open

from finetune.config.errors import ConfigError
from finetune.config.methods import LoraMethodConfig
from finetune.config.schema import ModelConfig
from finetune.export import lora_tools
from finetune.export.lora import export_lora
from finetune.export.lora_file import read_lora_file
from finetune.export.lora_math import layer_delta
from finetune.lora_tool import merge, run
from finetune.training.methods.adapters import adapter_config, attach

METADATA = {"base_model": "tiny-sd", "steps": "120", "resolution": "32", "num_train_images": "7"}


def _adapted_pipeline(base: Path, seed: int, rank: int, decay: float = 1.0) -> StableDiffusionPipeline:
    """LoCon on the U-Net (attention and convolutions) and LoRA on the text encoder, random weights.
    With `decay` < 1 the i-th rank component is scaled by decay**i, so most of each change lies in
    the first components (as in trained LoRAs), which a lower rank can keep."""
    pipe = StableDiffusionPipeline.from_pretrained(base)
    unet_cfg = LoraMethodConfig(algo="locon", rank=rank, alpha=rank / 2, conv_alpha=rank * 2)
    attach(pipe.unet, adapter_config(unet_cfg, unet_cfg.target_modules, convs=True))
    te_cfg = LoraMethodConfig(rank=2, alpha=3)
    attach(pipe.text_encoder, adapter_config(te_cfg, te_cfg.text_encoder_target_modules, convs=False))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for model in (pipe.unet, pipe.text_encoder):
            for name, param in model.named_parameters():
                if "lora_A" in name or "lora_B" in name:
                    values = torch.randn(param.shape, generator=generator) * 0.1
                    ranks = torch.tensor(
                        [decay**i for i in range(values.shape[1 if "lora_B" in name else 0])]
                    )
                    shape = [1] * values.dim()
                    shape[1 if "lora_B" in name else 0] = -1
                    param.copy_(values * ranks.reshape(shape))
    return pipe


@pytest.fixture(scope="module")
def loras(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two exported LoRAs (`a`: rank 8 with decaying components; `b`: rank 4) and their pipelines' outputs."""
    folder = tmp_path_factory.mktemp("loras")
    found = {}
    for name, seed, rank, decay in (("a", 1, 8, 0.5), ("b", 2, 4, 1.0)):
        pipe = _adapted_pipeline(tiny_model, seed, rank, decay)
        export_lora(folder / name, pipe.unet, pipe.text_encoder, metadata=METADATA)
        found[name] = folder / name
    return found


def _outputs(pipe) -> tuple[torch.Tensor, torch.Tensor]:
    """(text-encoder states, U-Net noise prediction) on fixed inputs."""
    ids = pipe.tokenizer(["a red circle"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        text = pipe.text_encoder(ids)[0]
        return text, pipe.unet(latents, 400, encoder_hidden_states=text).sample


def _with_adapters(base: Path, files: list[tuple[Path, float]]) -> StableDiffusionPipeline:
    pipe = StableDiffusionPipeline.from_pretrained(base)
    names = []
    for index, (file, _) in enumerate(files):
        pipe.load_lora_weights(file.parent, weight_name=file.name, adapter_name=f"lora{index}")
        names.append(f"lora{index}")
    pipe.set_adapters(names, [weight for _, weight in files])
    return pipe


def _model(folder: Path) -> ModelConfig:
    return ModelConfig(pretrained=str(folder), resolution=32)


def _tool_config(*overrides: str):
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose(config_name="lora_tool", overrides=list(overrides))


def test_inspect_names_the_algorithm_ranks_per_block_and_the_training_facts(loras: dict[str, Path]) -> None:
    file = loras["a"] / "lora_kohya.safetensors"
    report = lora_tools.inspect(str(file))
    lora = read_lora_file(file)
    assert report["algo"] == "lora" and report["layout"] == "kohya"
    assert report["layers"] == len(lora.layers) and report["keys"] == 3 * len(lora.layers)
    assert report["blocks"]["unet down_blocks.0"]["ranks"] == [8]
    assert report["blocks"]["unet down_blocks.0"]["alphas"] == [4.0, 16.0]  # attention, convolutions
    assert report["blocks"]["text_encoder"] == {"layers": 8, "ranks": [2], "alphas": [3.0]}
    assert report["facts"]["base_model"] == "tiny-sd" and report["facts"]["steps"] == "120"
    # the diffusers file says the same of its layers
    other = lora_tools.inspect(str(loras["a"] / "pytorch_lora_weights.safetensors"))
    assert other["layout"] == "diffusers" and other["blocks"] == report["blocks"]


def test_the_command_line_prints_the_report(loras: dict[str, Path], tmp_path: Path) -> None:
    file = loras["b"] / "lora_kohya.safetensors"
    done = run_module("finetune.lora_tool", ["inspect", f"file={file}"], cwd=tmp_path)
    printed = json.loads(done.stdout[done.stdout.index("{") :])
    assert printed["algo"] == "lora" and printed["layers"] == len(read_lora_file(file).layers)
    assert list(tmp_path.iterdir()) == []  # nothing written
    with pytest.raises(ConfigError, match="is one of the inputs"):  # the command would say it in one line
        run(_tool_config("command=resize", f"file={file}", "rank=2", f"out={file}"))


def test_convert_both_ways_gives_files_that_load_to_the_same_model(
    tiny_model: Path, loras: dict[str, Path], tmp_path: Path
) -> None:
    kohya = loras["a"] / "lora_kohya.safetensors"
    expected = _outputs(_with_adapters(tiny_model, [(kohya, 1.0)]))
    as_diffusers = tmp_path / "a_diffusers.safetensors"
    run(
        _tool_config(
            "command=convert",
            f"file={kohya}",
            "to=diffusers",
            f"model.pretrained={tiny_model}",
            f"out={as_diffusers}",
        )
    )
    for ours, theirs in zip(
        _outputs(_with_adapters(tiny_model, [(as_diffusers, 1.0)])), expected, strict=True
    ):
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-4)
    back = tmp_path / "a_kohya.safetensors"
    run(_tool_config("command=convert", f"file={as_diffusers}", "to=kohya", f"out={back}"))
    original, round_trip = read_lora_file(kohya), read_lora_file(back)
    assert original.layers.keys() == round_trip.layers.keys()
    for name, tensors in original.layers.items():
        for key, value in tensors.items():
            torch.testing.assert_close(round_trip.layers[name][key], value, msg=f"{name}.{key}")
    with safe_open(back, "pt") as handle:
        assert handle.metadata()["converted_from"] == as_diffusers.name
    with pytest.raises(ConfigError, match="already exists"):
        run(_tool_config("command=convert", f"file={kohya}", f"out={back}"))


def test_resize_to_the_same_rank_is_lossless_and_to_a_lower_rank_keeps_the_output_close(
    tiny_model: Path, loras: dict[str, Path], tmp_path: Path
) -> None:
    file = loras["a"] / "lora_kohya.safetensors"
    same = lora_tools.resize(str(file), str(tmp_path / "same.safetensors"), rank=8)
    original, resized = read_lora_file(file), read_lora_file(same["out"])
    for name, tensors in original.layers.items():
        assert resized.rank(name) == original.rank(name) and resized.alpha(name) == original.alpha(name)
        torch.testing.assert_close(
            layer_delta(resized.layers[name]), layer_delta(tensors), atol=1e-6, rtol=1e-4
        )

    # Rank 4 of 8, components decaying by half: the change of the U-Net's output stays within 5 % of
    # the full LoRA's change (the stated tolerance).
    lower = lora_tools.resize(str(file), str(tmp_path / "r4.safetensors"), rank=4)
    assert {after for _, after, _ in lower["layers"].values()} == {2, 4}  # the text encoder's rank 2 stays
    base = _outputs(StableDiffusionPipeline.from_pretrained(tiny_model))[1]
    full = _outputs(_with_adapters(tiny_model, [(file, 1.0)]))[1]
    small = _outputs(_with_adapters(tiny_model, [(Path(lower["out"]), 1.0)]))[1]
    assert (small - full).norm() <= 0.05 * (full - base).norm()

    dynamic = lora_tools.resize(str(file), str(tmp_path / "dyn.safetensors"), dynamic=0.9)
    assert all(kept >= 0.9 - 1e-6 and after <= before for before, after, kept in dynamic["layers"].values())
    assert any(after < before for before, after, _ in dynamic["layers"].values())


def test_merge_equals_the_pipeline_with_the_adapters_loaded(
    tiny_model: Path, loras: dict[str, Path], tmp_path: Path
) -> None:
    files = [
        (loras["a"] / "pytorch_lora_weights.safetensors", 0.8),
        (loras["b"] / "lora_kohya.safetensors", 0.5),
    ]
    written = merge(
        _model(tiny_model), [(str(path), weight) for path, weight in files], str(tmp_path / "merged")
    )
    merged = StableDiffusionPipeline.from_pretrained(written["diffusers"])
    for ours, theirs in zip(_outputs(merged), _outputs(_with_adapters(tiny_model, files)), strict=True):
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-4)
    assert written["single_file"].is_file()
    with pytest.raises(ConfigError, match="already exists"):
        merge(_model(tiny_model), [(str(files[0][0]), 1.0)], str(tmp_path / "merged"))


def test_combine_at_the_summed_rank_keeps_the_weighted_sum(loras: dict[str, Path], tmp_path: Path) -> None:
    a, b = (read_lora_file(loras[n] / "lora_kohya.safetensors") for n in ("a", "b"))
    sources = [
        (str(loras["a"] / "lora_kohya.safetensors"), 0.8),
        (str(loras["b"] / "pytorch_lora_weights.safetensors"), 0.5),
    ]
    result = lora_tools.combine(sources, rank=12, out=str(tmp_path / "ab.safetensors"))
    combined = read_lora_file(result["out"])
    assert combined.layers.keys() == a.layers.keys() | b.layers.keys()
    for name in combined.layers:
        expected = 0.8 * layer_delta(a.layers[name]) + 0.5 * layer_delta(b.layers[name])
        torch.testing.assert_close(layer_delta(combined.layers[name]), expected, atol=1e-5, rtol=1e-4)
    assert lora_tools.parse_weighted(["x.safetensors", "y.safetensors:-0.5"]) == [
        ("x.safetensors", 1.0),
        ("y.safetensors", -0.5),
    ]


def test_extract_from_a_model_with_a_lora_merged_in_recovers_its_change(
    tiny_model: Path, loras: dict[str, Path], tmp_path: Path
) -> None:
    file = loras["b"] / "lora_kohya.safetensors"  # rank 4 on the U-Net, 2 on the text encoder
    tuned = merge(_model(tiny_model), [(str(file), 1.0)], str(tmp_path / "tuned"))["diffusers"]
    out = tmp_path / "extracted.safetensors"
    run(_tool_config("command=extract", f"base={tiny_model}", f"tuned={tuned}", "rank=4", f"out={out}"))
    original, extracted = read_lora_file(file), read_lora_file(out)
    assert extracted.layers.keys() == original.layers.keys()  # the changed layers, and only those
    for name, tensors in original.layers.items():
        expected = layer_delta(tensors)
        torch.testing.assert_close(layer_delta(extracted.layers[name]), expected, atol=1e-5, rtol=1e-3)
