"""data.cache=memory under DDP: ranks swap their cache entries in bounded rounds, bit for bit.

Two CPU processes join a gloo group directly (no trainer) and call the exchange; every collective
call is recorded, to check that none carried more than the chunk bound."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file

from finetune.data.cache_fill import exchange_entries

CHUNK = 2000  # bytes: a round carries one to three of the entries below


def _entries(rank: int) -> dict[str, dict[str, torch.Tensor]]:
    """What rank `rank` computed: sizes and dtypes that do not line up with the chunk or with each other."""
    generator = torch.Generator().manual_seed(rank)
    entries = {}
    for i in range(12 + 3 * rank):  # ranks hold shares of other sizes: they need other numbers of rounds
        entries[f"rank{rank}-entry{i}"] = {
            "latent_dist": torch.randn(4, 8 + i, 5, generator=generator),
            "pooled_text_embeds": torch.randn(7 + i, generator=generator).to(torch.bfloat16),
            "odd": torch.randn(3, generator=generator).to(torch.float16),
        }
    entries[f"rank{rank}-empty"] = {"text_embeds": torch.zeros(0, 4)}
    return entries


def _run_rank(rank: int, world: int, rendezvous: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world)
    calls: list[dict[str, int]] = []
    original = dist.all_gather_object

    def recorded(output: list, value: object, group=None) -> None:
        carried = (
            sum(t.nbytes for tensors in value.values() for t in tensors.values())
            if isinstance(value, dict)
            else 0
        )
        calls.append({"tensor_bytes": carried, "pickled_bytes": len(pickle.dumps(value))})
        original(output, value, group)

    dist.all_gather_object = recorded
    try:
        entries = _entries(rank)
        exchange_entries(entries, chunk_bytes=CHUNK)
    finally:
        dist.all_gather_object = original
        dist.destroy_process_group()
    flat = {f"{key}/{name}": tensor for key, tensors in entries.items() for name, tensor in tensors.items()}
    save_file(flat, Path(out_dir) / f"rank{rank}.safetensors")
    (Path(out_dir) / f"rank{rank}.json").write_text(json.dumps(calls))


def test_every_rank_ends_with_every_entry_in_bounded_rounds(tmp_path: Path) -> None:
    mp.spawn(_run_rank, args=(2, str(tmp_path / "rendezvous"), str(tmp_path)), nprocs=2, join=True)
    expected = {
        f"{key}/{name}": tensor
        for rank in range(2)
        for key, tensors in _entries(rank).items()
        for name, tensor in tensors.items()
    }
    shares = [sum(t.nbytes for k, t in expected.items() if k.startswith(f"rank{r}-")) for r in range(2)]
    assert min(shares) > 5 * CHUNK  # so a whole share in one call would break the bound checked below
    calls = []
    for rank in range(2):
        held = load_file(tmp_path / f"rank{rank}.safetensors")
        assert held.keys() == expected.keys()
        for name, tensor in expected.items():
            assert held[name].dtype == tensor.dtype and held[name].shape == tensor.shape, name
            assert torch.equal(held[name].view(-1).view(torch.uint8), tensor.view(-1).view(torch.uint8)), name
        calls.append(json.loads((tmp_path / f"rank{rank}.json").read_text()))
    assert len(calls[0]) == len(calls[1]) > 5  # the ranks agreed on the rounds, and there were several
    for rank_calls in calls:
        assert max(call["tensor_bytes"] for call in rank_calls) <= CHUNK
        # Keys and pickling add a little: nowhere near a second chunk.
        assert max(call["pickled_bytes"] for call in rank_calls) <= CHUNK + 4096
