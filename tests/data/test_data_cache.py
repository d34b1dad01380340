"""The latent / text cache: same values as encoding on the fly, reused when unchanged, never stale."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from conftest import compose_config, fast_overrides
from PIL import Image

from finetune.config.schema import DataConfig, ModelConfig
from finetune.data import CaptionedImageDataModule
from finetune.data.images import FileImage
from finetune.models.loading import load_components
from finetune.train import train
from finetune.training.methods.adapters import add_lora


@pytest.fixture(scope="module")
def parts(tiny_model):
    return load_components(ModelConfig(pretrained=str(tiny_model), resolution=32))


def _images(root: Path, n: int = 3) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        image = Image.new("RGB", (40 + 8 * i, 32), (60 * i, 120, 200 - 50 * i))
        image.paste((255, 255, 255), (0, 0, 12, 32))  # a white left edge: flips are visible
        image.save(root / f"{i}.png")
        (root / f"{i}.txt").write_text(f"picture number {i}")
    return root


def _module(root: Path, parts, **overrides) -> CaptionedImageDataModule:
    settings = dict(path=str(root), resolution=32, batch_size=2, shuffle=False, random_flip=False)
    module = CaptionedImageDataModule(DataConfig(**{**settings, **overrides}), parts.tokenizer, seed=0)
    module.scan()
    return module


def test_cached_samples_hold_what_the_encoders_compute_from_the_same_sample(tmp_path, parts):
    root = _images(tmp_path / "data")
    plain = _module(root, parts, random_flip=True)
    plain.setup("fit")
    cached = _module(root, parts, random_flip=True, cache="memory")
    cache = cached.prepare_cache(parts.vae, parts.prompts)
    assert cache.computed == 3 * 2 + 3  # both orientations of each image, and each caption
    flips = set()
    for seed in range(8):  # the sample seed picks the flip, cached or not
        expected, got = plain.dataset[(1, seed)], cached.dataset[(1, seed)]
        assert "pixel_values" not in got and "input_ids" not in got
        with torch.no_grad():
            params = parts.vae.encode(expected["pixel_values"][None]).latent_dist.parameters[0]
            features = parts.text_encoder(expected["input_ids"][None], return_dict=False)[0][0]
        assert torch.allclose(got["latent_dist"], params, atol=1e-5)
        assert torch.allclose(got["text_embeds"], features, atol=1e-5)
        assert torch.equal(got["original_size"], expected["original_size"])
        flips.add(bool(torch.equal(got["latent_dist"], cache.latent(1, True))))
    assert flips == {True, False}


def test_disk_cache_reuses_unchanged_entries_and_recomputes_changed_ones(tmp_path, parts, monkeypatch):
    root, store = _images(tmp_path / "data"), tmp_path / "cache"

    def fill(**overrides):
        module = _module(root, parts, cache="disk", cache_dir=str(store), **overrides)
        return module.prepare_cache(parts.vae, parts.prompts)

    first = fill()
    assert (first.computed, first.reused) == (6, 0)
    assert len(list(store.rglob("*.safetensors"))) == 6

    hashed = []
    original = FileImage.fingerprint
    monkeypatch.setattr(FileImage, "fingerprint", lambda self: hashed.append(self.path) or original(self))
    again = fill()
    assert (again.computed, again.reused) == (0, 6)
    assert hashed == []  # unchanged files (same size and time) are not read again to be hashed

    Image.new("RGB", (48, 32), (1, 2, 3)).save(root / "1.png")  # new bytes, same name and size
    edited = fill()
    assert (edited.computed, edited.reused) == (1, 5)
    assert hashed == [root / "1.png"]
    assert torch.allclose(edited.latent(1, False), _encode(parts, root, 1), atol=1e-5)

    resized = fill(resolution=48)
    assert (resized.computed, resized.reused) == (3, 3)  # every image again; captions unchanged


def test_text_is_not_cached_while_the_text_encoder_trains_or_tags_shuffle(tmp_path, tiny_model):
    root, store = _images(tmp_path / "data"), tmp_path / "cache"
    parts = load_components(ModelConfig(pretrained=str(tiny_model), resolution=32))
    shuffled = _module(root, parts, cache="disk", cache_dir=str(store), shuffle_tags=True)
    cache = shuffled.prepare_cache(parts.vae, parts.prompts)
    assert cache.text_keys is None and any("tags are shuffled" in note for note in cache.notes)
    add_lora(parts.text_encoder, 4, None, ["q_proj"], init_weights=True)
    training = _module(root, parts, cache="disk", cache_dir=str(store))
    cache = training.prepare_cache(parts.vae, parts.prompts)
    assert cache.text_keys is None and any("text encoder trains" in note for note in cache.notes)
    assert (cache.computed, cache.reused) == (0, 3)  # the latents were cached by the first call
    assert "input_ids" in training.dataset[(0, 0)] and "latent_dist" in training.dataset[(0, 0)]


def _encode(parts, root: Path, index: int) -> torch.Tensor:
    """The VAE's distribution parameters for record `index`, computed on the fly."""
    plain = _module(root, parts)
    plain.setup("fit")
    with torch.no_grad():
        return parts.vae.encode(plain.dataset[(index, 0)]["pixel_values"][None]).latent_dist.parameters[0]


def test_a_file_that_fails_while_caching_is_dropped_with_its_reason(tmp_path, parts, caplog):
    root = _images(tmp_path / "data")
    data = (root / "2.png").read_bytes()
    module = _module(root, parts, cache="memory")
    (root / "2.png").write_bytes(data[:60])  # broken after the scan read its header
    with caplog.at_level(logging.WARNING):
        module.prepare_cache(parts.vae, parts.prompts)
    assert [r.key for r in module.records] == ["0.png", "1.png"]
    assert module.scan_result.skipped[-1].key == "2.png"
    assert "2.png" in caplog.text
    assert len(list(module.train_dataloader())) == 1  # two images left: one batch


@pytest.mark.slow
def test_training_with_the_cache_learns(tiny_model, tmp_path):
    overrides = fast_overrides(tiny_model, tmp_path / "run", steps=6) + [
        "data.cache=disk",
        f"data.cache_dir={tmp_path / 'cache'}",
        "optim.lr=1e-2",
    ]
    result = train(compose_config(overrides))
    assert result.global_step == 6
    assert len(list((tmp_path / "cache").rglob("*.safetensors"))) > 40  # images x 2 flips + captions
    lora_b = [p for n, p in result.module.named_parameters() if "lora_B" in n]
    assert any(p.abs().sum() > 0 for p in lora_b)


def test_model_identity_ignores_memory_layout():
    from finetune.data.cache import model_identity

    model = torch.nn.Conv2d(8, 4, 1).to(torch.bfloat16)  # a 1x1 convolution, as VAEs have
    plain = model_identity(model)
    assert model_identity(model.to(memory_format=torch.channels_last)) == plain
