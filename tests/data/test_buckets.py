"""Aspect-ratio buckets and the batch sampler: sizes, fitting, one bucket per batch, ranks, determinism."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image

from finetune.config.errors import ConfigError
from finetune.config.schema import DataConfig
from finetune.data import CaptionedImageDataModule
from finetune.data.buckets import bucket_sizes, choose_crop, fit_to, nearest_bucket
from finetune.data.sampler import BucketBatchSampler
from finetune.tiny.vocab import build_tokenizer


def test_sd_buckets_have_about_the_area_of_the_resolution_and_step_multiples():
    sizes = bucket_sizes(512, 64, 256, 1024, 4.0)
    assert (512, 512) in sizes and (768, 320) in sizes and (320, 768) in sizes
    for width, height in sizes:
        assert width % 64 == 0 and height % 64 == 0
        assert 0.75 * 512 * 512 <= width * height <= 512 * 512
        assert max(width, height) / min(width, height) <= 4.0
    with pytest.raises(ConfigError, match="data.bucket_step"):
        bucket_sizes(32, 64, 16, 64, 4.0)


def test_a_wide_image_lands_in_a_wide_bucket_unsquashed_with_its_crop_recorded():
    sizes = bucket_sizes(32, 8, 16, 64, 4.0)
    assert nearest_bucket(sizes, 96, 32) == (48, 16)  # 3:1 image, 3:1 bucket
    # Three squares side by side, each a different colour: after fitting they must still be squares.
    image = Image.new("RGB", (96, 32))
    for i, colour in enumerate([(255, 0, 0), (0, 255, 0), (0, 0, 255)]):
        image.paste(colour, (32 * i, 0, 32 * (i + 1), 32))
    fitted = fit_to(image, (48, 16), choose_crop(96, 32, (48, 16), random_crop=False), flip=False)
    pixels = np.asarray(fitted.image)
    assert pixels.shape == (16, 48, 3)
    # Each colour still spans 16 of the 48 columns: scaled by 1/2 evenly, not squashed into a square.
    dominant = pixels[8].argmax(axis=1)
    assert [int((dominant == c).sum()) for c in range(3)] == [16, 16, 16]
    assert fitted.original_size == (32, 96) and fitted.crop_top_left == (0, 0)


def test_crop_offsets_are_where_the_crop_was_taken():
    image = Image.new("RGB", (100, 32))
    image.paste((255, 255, 255), (60, 0, 100, 32))  # right part white
    generator = torch.Generator().manual_seed(3)
    top_left = choose_crop(100, 32, (32, 32), random_crop=True, generator=generator)
    fitted = fit_to(image, (32, 32), top_left, flip=False)
    top, left = fitted.crop_top_left
    assert top == 0 and 0 <= left <= 68
    white_columns = int((np.asarray(fitted.image)[0, :, 0] > 128).sum())
    assert white_columns == max(0, min(32, left + 32 - 60))


def test_every_batch_comes_from_one_bucket_and_every_sample_appears_once():
    buckets = [0, 1, 2] * 7 + [1]
    sampler = BucketBatchSampler(buckets, [1.0] * len(buckets), batch_size=3, seed=1)
    batches = list(sampler)
    for batch in batches:
        assert len({buckets[index] for index, _ in batch}) == 1
    assert sorted(index for batch in batches for index, _ in batch) == list(range(len(buckets)))
    assert len(sampler) == len(batches)


def test_ranks_share_an_epoch_evenly_and_the_order_is_a_function_of_seed_and_epoch():
    buckets = [0] * 10 + [1] * 5
    ranks = [BucketBatchSampler(buckets, [1.0] * 15, 2, seed=7, rank=r, world_size=2) for r in range(2)]
    per_rank = [list(sampler) for sampler in ranks]
    assert len(per_rank[0]) == len(per_rank[1])  # DDP steps in lockstep
    seen = Counter(index for batches in per_rank for batch in batches for index, _ in batch)
    assert set(seen) == set(range(15))  # all shown; the top-up to an even count repeats a few
    again = BucketBatchSampler(buckets, [1.0] * 15, 2, seed=7, rank=0, world_size=2)
    assert list(again) == per_rank[0]
    assert list(again) != per_rank[0]  # the next epoch is shuffled differently
    assert again.expected_batches() == len(per_rank[0])


def test_resumed_sampler_continues_with_the_next_unseen_batch():
    sampler = BucketBatchSampler([0, 1] * 10, [1.0] * 20, 2, seed=0, progress_fn=lambda: (0, 4))
    full = list(sampler)
    state = sampler.state_dict()
    assert state == {"epoch": 0, "batches_done": 4}
    resumed = BucketBatchSampler([0, 1] * 10, [1.0] * 20, 2, seed=0)
    resumed.load_state_dict(state)
    assert list(resumed) == full[4:]
    assert list(resumed) == BucketBatchSampler([0, 1] * 10, [1.0] * 20, 2, seed=0).epoch_batches(1)


def test_a_resume_saved_after_an_epochs_last_batch_starts_the_next_epoch_whole():
    # A multi-worker loader asks for the iterator while the trainer still counts the finished epoch.
    epoch_one = BucketBatchSampler([0, 1] * 10, [1.0] * 20, 2, seed=0).epoch_batches(1)
    resumed = BucketBatchSampler([0, 1] * 10, [1.0] * 20, 2, seed=0, epoch_fn=lambda: 0)
    resumed.load_state_dict({"epoch": 0, "batches_done": 10})
    assert list(resumed) == epoch_one


def test_datamodule_batches_follow_buckets(tmp_path):
    for i, size in enumerate([(96, 32), (90, 30), (32, 32), (32, 96)]):
        Image.new("RGB", size, (i * 40, 0, 0)).save(tmp_path / f"{i}.png")
        (tmp_path / f"{i}.txt").write_text(f"image {i}")
    cfg = DataConfig(
        path=str(tmp_path), resolution=32, buckets=True, bucket_step=8, batch_size=2, random_flip=False
    )
    module = CaptionedImageDataModule(cfg, build_tokenizer(tmp_path / "tok"), seed=0)
    module.setup("fit")
    shapes = sorted(tuple(batch["pixel_values"].shape) for batch in module.train_dataloader())
    assert shapes == [(1, 3, 32, 32), (1, 3, 64, 16), (2, 3, 16, 48)]


def test_decoding_workers_default_to_the_gpu_case_only(tmp_path, monkeypatch):
    from types import SimpleNamespace

    import torch

    module = CaptionedImageDataModule(DataConfig(path=str(tmp_path)), seed=0)
    assert module._default_workers() == 0  # no trainer: the CPU case, decode in-process
    monkeypatch.setattr("os.cpu_count", lambda: 16)
    module.trainer = SimpleNamespace(strategy=SimpleNamespace(root_device=torch.device("cuda", 0)))
    assert module._default_workers() == 4
    monkeypatch.setattr("os.cpu_count", lambda: 4)
    assert module._default_workers() == 2
