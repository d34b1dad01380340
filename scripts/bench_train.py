"""`bench.py train`: our training against a plain reference loop, same process, same data.

    .venv/bin/python scripts/bench.py train                      # tiny model, CPU, 32 px, batch 4
    .venv/bin/python scripts/bench.py train --cache              # after the defaults, cache=none and =memory
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
import logging
import tempfile
import time
import warnings
from pathlib import Path

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
from bench_report import describe, print_setup, print_table, rows_for, write_json
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
    parser.add_argument(
        "--gradient-checkpointing", action="store_true", help="both runs recompute U-Net activations"
    )
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if cuda else "cpu")
    parser.add_argument(
        "--cache", action="store_true", help="after the defaults, also data.cache=none and data.cache=memory"
    )
    parser.add_argument(
        "--also",
        action="append",
        default=[],
        metavar="'KEY=VALUE ...'",
        help="one more run of ours with these overrides (repeatable), e.g. --also 'model.compile=true'",
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


def prepare_model(args: argparse.Namespace, work: Path) -> Path:
    """The diffusers folder both runs load: the shipped tiny model, or a random sd15 / sdxl."""
    if args.model == "tiny":
        return PROJECT_DIR / "data" / "tiny-sd"
    dtype = torch.bfloat16 if args.precision.startswith("bf16") else torch.float32
    started = time.perf_counter()
    folder = save_random_pipeline(args.model, work / args.model, dtype, args.device)
    print(f"built a random-weight {args.model} in {time.perf_counter() - started:.1f} s: {folder}")
    return folder


def our_overrides(args: argparse.Namespace, model_dir: Path, run_dir: Path) -> list[str]:
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
        f"trainer.accelerator={'gpu' if args.device == 'cuda' else 'cpu'}",
        "trainer.devices=1",
        f"trainer.precision={args.precision}",
        f"model.gradient_checkpointing={str(args.gradient_checkpointing).lower()}",
        f"trainer.max_steps={args.warmup + args.steps}",
        "trainer.enable_progress_bar=false",
        "trainer.enable_model_summary=false",
        "logger=none",
        "validation.prompts=[]",
        "checkpoint.every_n_steps=1000000",
        f"run_dir={run_dir}",
    ]
    return model + method + run + list(args.set)


def our_variants(args: argparse.Namespace) -> list[list[str]]:
    """The overrides of each run of ours: the defaults first, then each option on its own."""
    variants: list[list[str]] = [[]]
    if args.cache:
        variants += [["data.cache=none"], ["data.cache=memory"]]
    return variants + [also.split() for also in args.also]


def run_ours(args: argparse.Namespace, model_dir: Path, run_dir: Path, variant: list[str]) -> RunStats:
    """`train(cfg)` for `warmup + steps` steps, clocked by a callback given as a user callback."""
    overrides = our_overrides(args, model_dir, run_dir) + variant
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
    name = "ours, " + (" ".join(variant) or "defaults")
    return RunStats.from_clock(name, args.batch_size, clock, start_memory, peak)


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
        gradient_checkpointing=args.gradient_checkpointing,
    )


def warm_up_device(device: str) -> None:
    """Create the CUDA context and library handles before any run is timed."""
    if device != "cuda":
        return
    x = torch.randn(64, 8, 32, 32, device=device)
    torch.nn.functional.conv2d(x, torch.randn(8, 8, 3, 3, device=device)).sum().item()
    (x.flatten(1) @ x.flatten(1).T).sum().item()


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
        variants = our_variants(args)
        runs = [run_ours(args, model_dir, work / f"run_{i}", variant) for i, variant in enumerate(variants)]
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
