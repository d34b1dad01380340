"""`bench.py train`'s output: the table, the setup line and the JSON file, from the runs' stats.

python scripts/bench_report.py a.json b.json ...     # one summary table of several bench runs
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from bench_measure import RunStats


@dataclass
class Row:
    """A run as printed: its stats, and what follows from them and the FLOPs."""

    stats: RunStats
    tflops: float | None = None
    mfu: float | None = None
    ratio: float | None = None  # steps/s over the reference's
    median_ratio: float | None = None  # the reference's median step time over this run's


def rows_for(runs: list[RunStats], reference: RunStats, flops: int, peak: float | None) -> list[Row]:
    rows = []
    for stats in [*runs, reference]:
        achieved = flops * stats.images_per_s
        ratio = stats.steps_per_s / reference.steps_per_s if reference.steps_per_s else None
        median = reference.median_step_s / stats.median_step_s if stats.median_step_s else None
        rows.append(Row(stats, achieved / 1e12, achieved / peak if peak else None, ratio, median))
    return rows


def print_table(rows: list[Row], device: str) -> None:
    memory = "CUDA alloc" if device == "cuda" else "RSS"
    width = max(24, *(len(row.stats.name) + 2 for row in rows))
    header = (
        f"{'run':<{width}}{'steps/s':>8}{'images/s':>10}{'ms/step':>9}{'startup s':>10}{'warm-up s':>10}"
        f"{memory + ' peak (start)':>25}{'TFLOP/s':>9}{'MFU':>7}{'vs ref':>8}{'(median)':>9}"
    )
    print(header)
    print("-" * len(header))
    for row in rows:
        s = row.stats
        mfu = f"{row.mfu:.1%}" if row.mfu is not None else "n/a"
        memory = f"{s.peak_memory / 2**30:.2f} GiB ({s.start_memory / 2**30:.2f})"
        print(
            f"{s.name:<{width}}{s.steps_per_s:8.2f}{s.images_per_s:10.1f}{s.median_step_s * 1e3:9.1f}"
            f"{s.startup_s:10.1f}{s.warmed_up_s:10.1f}{memory:>25}{row.tflops:9.3f}{mfu:>7}"
            f"{_times(row.ratio):>8}{_times(row.median_ratio):>9}"
        )
    print(
        "steps/s, images/s, TFLOP/s, vs ref: over all timed steps; ms/step and (median): the median step;"
        "\nstartup: call -> first step done; warm-up: call -> last untimed step done"
    )


def _times(ratio: float | None) -> str:
    return f"{ratio:.2f}x" if ratio else "n/a"


def describe(args: argparse.Namespace, device_name: str, flops: int, peak: float | None) -> dict[str, Any]:
    return {
        "model": args.model,
        "method": args.method,
        "rank": args.rank if args.method == "lora" else None,
        "resolution": args.resolution,
        "batch_size": args.batch_size,
        "precision": args.precision,
        "gradient_checkpointing": args.gradient_checkpointing,
        "device": device_name,
        "torch": torch.__version__,
        "steps": args.steps,
        "warmup": args.warmup,
        "workers": args.workers,
        "threads": torch.get_num_threads(),
        "data": str(args.data),
        "our_overrides": list(args.set),
        "unet_step_flops_per_image": flops,
        "peak_bf16_flops": peak,
    }


def print_setup(setup: dict[str, Any]) -> None:
    peak = setup["peak_bf16_flops"]
    mfu = f"MFU against {peak / 1e12:.0f} TFLOP/s (dense bf16)" if peak else "MFU n/a (no peak known)"
    print(
        f"\n{setup['model']} {setup['method']}, {setup['resolution']} px, batch {setup['batch_size']}, "
        f"{setup['precision']}{', gradient checkpointing' if setup['gradient_checkpointing'] else ''}; "
        f"{setup['device']}, torch {setup['torch']}, {setup['threads']} CPU threads; "
        f"{setup['steps']} steps timed after {setup['warmup']}; U-Net step "
        f"{setup['unet_step_flops_per_image'] / 1e9:.2f} GFLOP/image; {mfu}"
    )
    if setup["our_overrides"]:
        print("our run also has: " + " ".join(setup["our_overrides"]))


def write_json(path: Path, setup: dict[str, Any], rows: list[Row]) -> None:
    runs = []
    for row in rows:
        stats = asdict(row.stats)
        stats.update(
            steps_per_s=row.stats.steps_per_s,
            images_per_s=row.stats.images_per_s,
            tflops=row.tflops,
            mfu=row.mfu,
            ratio_to_reference=row.ratio,
            median_ratio_to_reference=row.median_ratio,
        )
        runs.append(stats)
    path.write_text(json.dumps({"setup": setup, "runs": runs}, indent=2) + "\n")


def summary(paths: list[Path]) -> str:
    """One line per run of each JSON file `--json` wrote: the setup, images/s, MFU, peak, ratio, start-up
    and warm-up (call -> last untimed step done)."""
    lines = [
        f"{'setup':<38}{'run':<44}{'images/s':>9}{'MFU':>7}{'peak GiB':>9}{'vs ref':>8}{'startup s':>10}"
        f"{'warm-up s':>10}"
    ]
    for path in paths:
        result = json.loads(path.read_text())
        setup = result["setup"]
        where = f"{setup['model']} {setup['resolution']}px b{setup['batch_size']} {setup['precision']}"
        where += " gc" if setup.get("gradient_checkpointing") else ""
        for run in result["runs"]:
            mfu = f"{run['mfu']:.1%}" if run["mfu"] is not None else "n/a"
            lines.append(
                f"{where:<38}{run['name']:<44}{run['images_per_s']:9.1f}{mfu:>7}"
                f"{run['peak_memory'] / 2**30:9.2f}{_times(run['ratio_to_reference']):>8}"
                f"{run['startup_s']:10.1f}{run['warmed_up_s']:10.1f}"
            )
    return "\n".join(lines)


if __name__ == "__main__":
    print(summary([Path(arg) for arg in sys.argv[1:]]))
