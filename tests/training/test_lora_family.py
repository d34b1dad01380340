"""method.algo=lora|locon|loha|lokr|dora: each trains on the tiny model, and its exported files give back
the trained U-Net — read by LyCORIS (the library A1111's and kohya's LyCORIS support are built on) and,
where diffusers loads the algorithm, by diffusers."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import pytest
import torch
from conftest import compose_config, fast_overrides
from diffusers import StableDiffusionPipeline, UNet2DConditionModel
from lycoris.kohya import LycorisNetworkKohya, create_network_from_weights
from peft.tuners.loha import LoHaLayer
from peft.tuners.lokr import LoKrLayer
from peft.tuners.lora import LoraLayer
from safetensors import safe_open
from safetensors.torch import load_file

from finetune.config.errors import ConfigError
from finetune.export.lora_apply import fuse_file, pipeline_models
from finetune.export.lora_file import read_lora_file
from finetune.export.lora_math import layer_delta
from finetune.export.lora_tools import convert
from finetune.train import train

# algo -> (overrides, the kohya tensor names of its layers, is a diffusers file written). Every alpha
# differs from its rank, so a scale the export gets wrong shows.
ALGOS = {
    "lora": (["method.alpha=4"], {"lora_down.weight", "lora_up.weight", "alpha"}, True),
    "locon": (
        ["method.alpha=4", "method.conv_alpha=2"],
        {"lora_down.weight", "lora_up.weight", "alpha"},
        True,
    ),
    "loha": (
        ["method.alpha=2", "method.conv_rank=4"],
        {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "alpha"},
        False,
    ),
    # On the tiny U-Net this gives all three LoKr layouts: both factors low-rank, only the second, and
    # neither (whole matrices, which readers do not scale by alpha / rank).
    "lokr": (
        ["method.rank=4", "method.alpha=1", "method.conv_rank=2", "method.lokr_decompose_both=true"],
        {"lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "alpha"},
        False,
    ),
    "dora": (
        ["method.alpha=2", "method.conv_rank=4"],
        {"lora_down.weight", "lora_up.weight", "alpha", "dora_scale"},
        True,
    ),
}
LAYERS = (LoraLayer, LoHaLayer, LoKrLayer)


def _unet_inputs(unet: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(3)
    latents = torch.randn(2, unet.config.in_channels, 8, 8, generator=generator)
    text = torch.randn(2, 77, unet.config.cross_attention_dim, generator=generator)
    return latents, torch.tensor([100, 700]), text


@torch.no_grad()
def _noise(unet: torch.nn.Module) -> torch.Tensor:
    latents, timesteps, text = _unet_inputs(unet)
    return unet(latents, timesteps, encoder_hidden_states=text).sample


def _lycoris_unet(base: Path, weights: dict[str, torch.Tensor], monkeypatch: pytest.MonkeyPatch):
    """A fresh base U-Net with the kohya file applied by LyCORIS; and how many layers it matched."""
    # LyCORIS's network constructor lists `time_embedding.linear_1` twice for diffusers U-Nets (by block
    # type and by name) and asserts on it; the file's own layers are matched by name afterwards.
    monkeypatch.setattr(LycorisNetworkKohya, "UNET_TARGET_REPLACE_NAME", [])
    unet = UNet2DConditionModel.from_pretrained(base, subfolder="unet")
    logging.getLogger("lycoris").setLevel(logging.WARNING)
    network, _ = create_network_from_weights(1.0, None, None, None, unet, weights_sd=weights)
    network.apply_to(None, unet, apply_text_encoder=False, apply_unet=True)
    return unet, len(network.unet_loras)


@pytest.mark.parametrize("algo", list(ALGOS))
def test_each_algorithm_trains_and_its_files_give_back_the_trained_unet(
    tiny_model: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    algo: str,
) -> None:
    extra, tensor_names, diffusers_file = ALGOS[algo]
    overrides = fast_overrides(tiny_model, tmp_path, steps=2) + [f"method.algo={algo}", "optim.lr=1e-2"]
    overrides += ["validation.every_n_steps=0", "logger=none"] + extra
    with caplog.at_level(logging.WARNING, logger="finetune"):
        result = train(compose_config(overrides))
    # A file no tool would load is not written, and the log says so.
    assert ("pytorch_lora_weights.safetensors not written" in caplog.text) == (not diffusers_file)
    trained = result.module.unet.eval()
    adapted = [name for name, module in trained.named_modules() if isinstance(module, LAYERS)]
    convs = [
        name for name in adapted if isinstance(trained.get_submodule(name).get_base_layer(), torch.nn.Conv2d)
    ]
    assert bool(convs) == (algo != "lora"), convs  # locon and every algo given a conv_rank adapt convolutions

    kohya_path = tmp_path / "adapter" / "lora_kohya.safetensors"
    kohya = load_file(kohya_path)
    assert {key.split(".", 1)[1] for key in kohya} <= tensor_names
    assert len({key.split(".", 1)[0] for key in kohya}) == len(adapted)  # every adapted layer, once
    with safe_open(kohya_path, "pt") as handle:
        header = handle.metadata()
    assert header["algo"] == algo
    args = json.loads(header.get("ss_network_args", "{}"))
    assert args.get("algo", "lora") == ("lora" if algo in ("lora", "locon", "dora") else algo)
    assert ("dora_wd" in args) == (algo == "dora") and ("conv_dim" in args) == bool(convs)

    # LyCORIS reads every layer of the file onto a fresh U-Net, which then answers as the trained one.
    expected, base_noise = (
        _noise(trained),
        _noise(UNet2DConditionModel.from_pretrained(tiny_model, subfolder="unet")),
    )
    assert (expected - base_noise).abs().max() > 1e-3  # training moved it
    unet, matched = _lycoris_unet(tiny_model, kohya, monkeypatch)
    assert matched == len(adapted)
    torch.testing.assert_close(_noise(unet), expected, atol=2e-5, rtol=1e-4)

    # Fused into a fresh pipeline's weights (finetune-lora merge, finetune-generate), the same.
    pipe = StableDiffusionPipeline.from_pretrained(tiny_model)
    assert fuse_file(pipeline_models(pipe), read_lora_file(kohya_path), 1.0, key="test") == len(adapted)
    torch.testing.assert_close(_noise(pipe.unet), expected, atol=2e-5, rtol=1e-4)

    diffusers_path = tmp_path / "adapter" / "pytorch_lora_weights.safetensors"
    assert diffusers_path.exists() == diffusers_file
    if diffusers_file:
        pipe = StableDiffusionPipeline.from_pretrained(tiny_model)
        pipe.load_lora_weights(tmp_path / "adapter")
        torch.testing.assert_close(_noise(pipe.unet), expected, atol=2e-5, rtol=1e-4)
        # the kohya file converted by finetune-lora loads in diffusers the same
        converted = tmp_path / "converted.safetensors"
        convert(
            str(kohya_path), "diffusers", str(converted), StableDiffusionPipeline.from_pretrained(tiny_model)
        )
        pipe = StableDiffusionPipeline.from_pretrained(tiny_model)
        pipe.load_lora_weights(tmp_path, weight_name=converted.name)
        torch.testing.assert_close(_noise(pipe.unet), expected, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("algo", ["locon", "loha", "lokr"])
def test_each_layers_delta_in_the_file_is_the_trained_modules_delta(
    tiny_model: Path, tmp_path: Path, algo: str
) -> None:
    """Layer by layer: the weight change the file encodes, as readers build it (`lora_math`, which
    follows ComfyUI's LoHa / LoKr loaders and is no part of the writer), equals the one peft trained."""
    extra, _, _ = ALGOS[algo]
    overrides = fast_overrides(tiny_model, tmp_path, steps=1) + [f"method.algo={algo}", "optim.lr=1e-2"]
    result = train(compose_config(overrides + ["validation.every_n_steps=0", "logger=none"] + extra))
    weights = load_file(tmp_path / "adapter" / "lora_kohya.safetensors")
    moved = 0
    for name, layer in result.module.unet.named_modules():
        if not isinstance(layer, LAYERS):
            continue
        prefix = f"lora_unet_{name.replace('.', '_')}."
        tensors = {
            key.removeprefix(prefix): value for key, value in weights.items() if key.startswith(prefix)
        }
        trained = layer.get_delta_weight("default")
        torch.testing.assert_close(layer_delta(tensors).reshape(trained.shape), trained, atol=1e-7, rtol=1e-5)
        moved += bool(trained.abs().sum() > 0)
    assert moved > 0


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["method.algo=loha", "method.dropout=0.1"], "method.dropout: not used by algo=loha"),
        (["method.algo=lora", "method.rank_dropout=0.1"], "method.rank_dropout / module_dropout: for loha"),
        (["method.algo=lokr", "optim.loraplus_ratio=16"], "optim.loraplus_ratio: LoRA+ speeds up"),
        (["method.algo=lokr", "method.lokr_factor=0"], "method.lokr_factor: 0 must be -1"),
        (["method.conv_rank=0"], "method.conv_rank: 0 must be greater than 0"),
    ],
)
def test_knobs_of_another_algorithm_fail_in_one_line(
    tmp_path: Path, overrides: list[str], message: str
) -> None:
    from finetune.training.checks import check_config

    with pytest.raises(ConfigError, match=re.escape(message)):
        check_config(compose_config([f"run_dir={tmp_path}", *overrides]))


def test_an_unknown_algorithm_fails_when_the_config_is_composed() -> None:
    with pytest.raises(Exception, match="lycoris") as error:
        compose_config(["method.algo=lycoris"])
    assert "algo" in str(error.value.__cause__ or error.value)


@pytest.mark.parametrize(
    ("algo", "file"),
    [
        ("locon", "lora_kohya.safetensors"),
        ("locon", "pytorch_lora_weights.safetensors"),
        ("dora", "lora_kohya.safetensors"),
        ("dora", "pytorch_lora_weights.safetensors"),
        ("loha", "lora_kohya.safetensors"),
    ],
)
def test_init_from_continues_from_a_file_of_either_layout(
    tiny_model: Path, tmp_path: Path, algo: str, file: str
) -> None:
    extra, _, _ = ALGOS[algo]
    quiet = ["validation.every_n_steps=0", "logger=none", f"method.algo={algo}"]
    first = train(
        compose_config(
            fast_overrides(tiny_model, tmp_path / "first", steps=2) + quiet + extra + ["optim.lr=1e-2"]
        )
    )
    expected = _noise(first.module.unet.eval())

    # The file decides the layers, ranks and alphas (method.rank says otherwise and is not used). A
    # learning rate of 1e-30 leaves the loaded weights as they are through the one step taken.
    init = [f"method.init_from={tmp_path / 'first' / 'adapter' / file}", "method.rank=2", "optim.lr=1e-30"]
    second = train(compose_config(fast_overrides(tiny_model, tmp_path / "second", steps=1) + quiet + init))
    torch.testing.assert_close(_noise(second.module.unet.eval()), expected, atol=2e-5, rtol=1e-4)
    before = load_file(tmp_path / "first" / "adapter" / "lora_kohya.safetensors")
    after = load_file(tmp_path / "second" / "adapter" / "lora_kohya.safetensors")
    assert before.keys() == after.keys()
    for name in before:
        torch.testing.assert_close(after[name], before[name], atol=1e-6, rtol=1e-5, msg=name)


@pytest.mark.parametrize(
    ("algo", "message"),
    [
        ("lora", "holds a dora adapter; set method.algo=dora"),
        ("lokr", "holds a dora adapter; set method.algo=dora"),
    ],
)
def test_init_from_refuses_a_file_of_another_algorithm(
    tiny_model: Path, tmp_path: Path, algo: str, message: str
) -> None:
    from finetune.training.checks import check_config

    extra, _, _ = ALGOS["dora"]
    quiet = ["validation.every_n_steps=0", "logger=none"]
    train(
        compose_config(
            fast_overrides(tiny_model, tmp_path / "first", steps=1) + quiet + extra + ["method.algo=dora"]
        )
    )
    init = [
        f"method.init_from={tmp_path / 'first' / 'adapter' / 'lora_kohya.safetensors'}",
        f"method.algo={algo}",
    ]
    with pytest.raises(ConfigError, match=re.escape(message)):
        check_config(compose_config([f"run_dir={tmp_path / 'second'}", *init]))
    with pytest.raises(ConfigError, match="no such LoRA file"):
        check_config(
            compose_config(
                [f"run_dir={tmp_path / 'third'}", f"method.init_from={tmp_path / 'none.safetensors'}"]
            )
        )


def test_generate_fuses_a_lokr_adapter_that_diffusers_cannot_load(tiny_model: Path, tmp_path: Path) -> None:
    from conftest import CONF_DIR
    from hydra import compose, initialize_config_dir
    from PIL import Image, ImageChops

    from finetune.generate import generate

    extra, _, _ = ALGOS["lokr"]
    overrides = fast_overrides(tiny_model, tmp_path / "run", steps=2) + ["method.algo=lokr", "optim.lr=5e-2"]
    train(compose_config(overrides + ["validation.every_n_steps=0", "logger=none"] + extra))
    images = {}
    for name, adapter in (("base", []), ("lokr", [f"adapter={tmp_path / 'run' / 'adapter'}"])):
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            cfg = compose(
                "generate",
                [
                    f"model.pretrained={tiny_model}",
                    "count=1",
                    "steps=2",
                    f"out_dir={tmp_path / name}",
                    *adapter,
                ],
            )
        (written,) = generate(cfg)
        images[name] = Image.open(written).convert("RGB")
    assert ImageChops.difference(images["base"], images["lokr"]).getbbox() is not None  # the adapter acts
