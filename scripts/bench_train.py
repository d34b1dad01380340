"""`bench.py train`: our training against a plain reference loop, same process, same data.

    .venv/bin/python scripts/bench.py train                      # tiny model, CPU, 32 px, batch 4
    .venv/bin/python scripts/bench.py train --cache              # after the default, cache=none and =memory
    python scripts/bench.py train --model sd15 --resolution 512 --batch-size 8 \\
        --precision bf16-mixed --device cuda --cache --json sd15.json

Our run is `finetune.train.train(cfg)` on a composed config (loggers, sample grids and checkpoints
off), timed by a Lightning callback; the reference is `bench_reference.py`. Each reports steps/s
and images/s over the steps after `--warmup`, start-up (call -> first step done), peak memory, and,
from the U-Net step's FLOPs per image, achieved TFLOP/s and MFU (GPU; against the dense bf16 peak).
`sd15` / `sdxl` are random-weight models of those architectures, built and saved first.
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import diffusers
import torch
import transformers
from bench_measure import (
    RunStats,
    StepClockCallback,
    peak_flops,
    peak_memory,
    process_defaults,
    release_memory,
    reset_peak_memory,
)
from bench_models import save_random_pipeline
from bench_reference import ReferenceSetup, run_reference
from hydra import compose, initialize_config_dir

from finetune.config.store import CONF_DIR, PROJECT_DIR
from finetune.train import train

DEFAULT_RESOLUTION = {"tiny": 32, "sd15": 512, "sdxl": 1024}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    cuda = torch.cuda.is_available()
    parser.add_argument("--model", choices=("tiny", "sd15", "sdxl"), default="tiny")
    parser.add_argument("--resolution", type=int, help="default: the model's (32, 512, 1024)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--method", choices=("lora", "controlnet"), default="lora")
    parser.add_argument("--rank", type=int, default=8, help="LoRA rank, both runs")
    parser.add_argument("--steps", type=int, default=30, help="timed steps, after the warm-up")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first (at least 1)")
    parser.add_argument("--precision", choices=("32-true", "bf16-mixed"), default="32-true")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if cuda else "cpu")
    parser.add_argument(
        "--cache",
        action="store_true",
        help="after the default (data.cache=auto), also data.cache=none and memory",
    )
    parser.add_argument("--data", type=Path, default=PROJECT_DIR / "data" / "style", help="captioned images")
    parser.add_argument("--workers", type=int, default=0, help="DataLoader workers, both runs")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--peak-flops", type=float, help="peak FLOP/s for MFU, if the GPU is not known")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a config override for our run (repeatable), e.g. --set model.compile=true",
    )


@dataclass
class Row:
    """A run as printed: its stats, and what follows from them and the FLOPs."""

    stats: RunStats
    tflops: float | None = None
    mfu: float | None = None
    ratio: float | None = None  # steps/s over the reference's
    median_ratio: float | None = None  # the reference's median step time over this run's


def prepare_model(args: argparse.Namespace, work: Path) -> Path:
    """The diffusers folder both runs load: the shipped tiny model, or a random sd15 / sdxl."""
    if args.model == "tiny":
        return PROJECT_DIR / "data" / "tiny-sd"
    dtype = torch.bfloat16 if args.precision.startswith("bf16") else torch.float32
    started = time.perf_counter()
    folder = save_random_pipeline(args.model, work / args.model, dtype, args.device)
    print(f"built a random-weight {args.model} in {time.perf_counter() - started:.1f} s: {folder}")
    return folder


def our_overrides(args: argparse.Namespace, model_dir: Path, run_dir: Path, cache: str) -> list[str]:
    """The config of our run: the benchmark's setup, with loggers, samples and checkpoints off."""
    model = ["model=tiny"] if args.model == "tiny" else ["model=sd15", f"model.pretrained={model_dir}"]
    method = (
        ["method=controlnet", "data.conditioning=canny"]
        if args.method == "controlnet"
        else ["method=lora", f"method.rank={args.rank}"]
    )
    run = [
        f"model.resolution={args.resolution}",
        f"data.path={args.data}",
        f"data.batch_size={args.batch_size}",
        f"data.num_workers={args.workers}",
        f"data.cache={cache}",
        f"trainer.accelerator={'gpu' if args.device == 'cuda' else 'cpu'}",
        "trainer.devices=1",
        f"trainer.precision={args.precision}",
        f"trainer.max_steps={args.warmup + args.steps}",
        "trainer.enable_progress_bar=false",
        "trainer.enable_model_summary=false",
        "logger=none",
        "validation.prompts=[]",
        "checkpoint.every_n_steps=1000000",
        f"run_dir={run_dir}",
    ]
    return model + method + run + list(args.set)


def run_ours(args: argparse.Namespace, model_dir: Path, work: Path, cache: str) -> RunStats:
    """`train(cfg)` for `warmup + steps` steps, clocked by a callback given as a user callback."""
    overrides = our_overrides(args, model_dir, work / f"run_{cache}", cache)
    start_memory = reset_peak_memory(args.device)
    started = time.perf_counter()
    callback = [
        "+callbacks.clock._target_=bench_measure.StepClockCallback",
        f"+callbacks.clock.device={args.device}",
        f"+callbacks.clock.warmup={args.warmup}",
        f"+callbacks.clock.started={started}",
    ]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides + callback)
    with process_defaults():
        train(cfg)
    peak = peak_memory(args.device)
    assert StepClockCallback.last is not None
    clock = StepClockCallback.last.clock
    # Lightning gave the callback the module's `log` methods: let go of it, so the models are freed.
    StepClockCallback.last = None
    release_memory(args.device)
    assert clock.timed_steps() == args.steps
    return RunStats.from_clock(f"ours, data.cache={cache}", args.batch_size, clock, start_memory, peak)


def reference_setup(args: argparse.Namespace, model_dir: Path) -> ReferenceSetup:
    return ReferenceSetup(
        model_dir=model_dir,
        data_dir=args.data,
        resolution=args.resolution,
        batch_size=args.batch_size,
        method=args.method,
        rank=args.rank,
        device=args.device,
        bf16=args.precision.startswith("bf16"),
        workers=args.workers,
    )


def warm_up_device(device: str) -> None:
    """Create the CUDA context and library handles before any run is timed."""
    if device != "cuda":
        return
    x = torch.randn(64, 8, 32, 32, device=device)
    torch.nn.functional.conv2d(x, torch.randn(8, 8, 3, 3, device=device)).sum().item()
    (x.flatten(1) @ x.flatten(1).T).sum().item()


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
    header = (
        f"{'run':<24}{'steps/s':>8}{'images/s':>10}{'ms/step':>9}{'startup s':>10}"
        f"{memory + ' peak (start)':>25}{'TFLOP/s':>9}{'MFU':>7}{'vs ref':>8}{'(median)':>9}"
    )
    print(header)
    print("-" * len(header))
    for row in rows:
        s = row.stats
        mfu = f"{row.mfu:.1%}" if row.mfu is not None else "n/a"
        memory = f"{s.peak_memory / 2**30:.2f} GiB ({s.start_memory / 2**30:.2f})"
        print(
            f"{s.name:<24}{s.steps_per_s:8.2f}{s.images_per_s:10.1f}{s.median_step_s * 1e3:9.1f}"
            f"{s.startup_s:10.1f}{memory:>25}{row.tflops:9.3f}{mfu:>7}"
            f"{_times(row.ratio):>8}{_times(row.median_ratio):>9}"
        )
    print(
        "steps/s, images/s, TFLOP/s, vs ref: over all timed steps; ms/step and (median): the median step;"
        "\nstartup: call -> first step done"
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
        f"{setup['precision']}; {setup['device']}, torch {setup['torch']}, {setup['threads']} CPU threads; "
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


def quiet() -> None:
    """The table is the output: no per-run banners, reports or known warnings."""
    for noisy in ("lightning", "lightning.pytorch", "lightning.fabric", "finetune"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=r".*does not have many workers.*")
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    diffusers.utils.logging.set_verbosity_error()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def main(args: argparse.Namespace) -> int:
    if args.warmup < 1 or args.steps < 1:
        raise SystemExit("--warmup and --steps must be at least 1")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device here")
    args.resolution = args.resolution or DEFAULT_RESOLUTION[args.model]
    quiet()
    if args.threads:
        torch.set_num_threads(args.threads)
    warm_up_device(args.device)
    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
        work = Path(tmp)
        model_dir = prepare_model(args, work)
        # The default configuration first (data.cache=auto), then each option alone.
        caches = ("auto", "none", "memory") if args.cache else ("auto",)
        runs = [run_ours(args, model_dir, work, cache) for cache in caches]
        reference, flops = run_reference(reference_setup(args, model_dir), args.warmup, args.steps)
    peak, device_name = peak_flops(args.device, args.peak_flops)
    setup = describe(args, device_name, flops, peak)
    print_setup(setup)
    rows = rows_for(runs, reference, flops, peak)
    print_table(rows, args.device)
    if args.json:
        write_json(args.json, setup, rows)
        print(f"written: {args.json}")
    return 0
