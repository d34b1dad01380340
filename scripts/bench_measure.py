"""What `bench.py train` measures, the same way for our run and for the reference loop.

Step times (the GPU waited for at each step, so a step ends when its kernels do), peak memory
(CUDA max allocated, or the process's peak RSS on CPU), FLOPs of one U-Net training step from
`torch.utils.flop_counter.FlopCounterMode`, and the accelerator's peak FLOP/s for MFU.
"""

from __future__ import annotations

import ctypes
import gc
import resource
import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

# Dense bf16 tensor-core peaks (no sparsity), from the vendors' data sheets; matched in this order
# against torch.cuda.get_device_name(), so "H100 PCIe" is tried before "H100" (the SXM part).
PEAK_BF16_FLOPS: tuple[tuple[str, float], ...] = (
    ("H200", 989e12),
    ("H100 PCIe", 756e12),
    ("H100", 989e12),
    ("A100", 312e12),
    ("L40S", 362e12),
    ("L4", 121e12),
    ("A10", 125e12),
)

_CLEAR_REFS = Path("/proc/self/clear_refs")
_STATUS = Path("/proc/self/status")


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


class StepClock:
    """Wall-clock marks at the end of each optimizer step; `started` is when the run was called."""

    def __init__(self, device: str, warmup: int, started: float | None = None) -> None:
        self.device, self.warmup = device, warmup
        self.started = time.perf_counter() if started is None else started
        self.marks: list[float] = []

    def tick(self) -> None:
        synchronize(self.device)
        self.marks.append(time.perf_counter())

    def timed_steps(self) -> int:
        """Steps after the warm-up ones (their time starts at the end of the last warm-up step)."""
        return max(0, len(self.marks) - self.warmup)

    def timed_seconds(self) -> float:
        return self.marks[-1] - self.marks[self.warmup - 1] if self.timed_steps() else 0.0

    def step_seconds(self) -> list[float]:
        """Duration of each timed step."""
        timed = self.marks[self.warmup - 1 :]
        return [after - before for before, after in zip(timed, timed[1:], strict=False)]

    def startup_s(self) -> float:
        """From the call that builds everything to the end of the first step."""
        return self.marks[0] - self.started if self.marks else 0.0

    def warmed_up_s(self) -> float:
        """From the call to the end of the last warm-up step: start-up, compiles and all."""
        return self.marks[self.warmup - 1] - self.started if len(self.marks) >= self.warmup else 0.0


class StepClockCallback(L.Callback):
    """A `StepClock` inside a Lightning run, given as a user callback (`callbacks.<name>._target_`).

    `started` is the `time.perf_counter()` value at which the run was called; `StepClockCallback.last`
    is the instance of the latest run, to read the marks back.
    """

    last: StepClockCallback | None = None

    def __init__(self, device: str, warmup: int, started: float) -> None:
        self.clock = StepClock(device, warmup, started)
        StepClockCallback.last = self

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        self.clock.tick()


@dataclass
class RunStats:
    """One timed run: its clock's results and its memory (bytes) at the start and at the peak."""

    name: str
    batch_size: int
    steps: int
    seconds: float
    startup_s: float
    warmed_up_s: float  # call -> end of the warm-up steps
    start_memory: int
    peak_memory: int
    step_seconds: list[float] = field(default_factory=list)

    @classmethod
    def from_clock(cls, name: str, batch_size: int, clock: StepClock, start: int, peak: int) -> RunStats:
        steps, seconds, startup = clock.timed_steps(), clock.timed_seconds(), clock.startup_s()
        warmed_up = clock.warmed_up_s()
        return cls(name, batch_size, steps, seconds, startup, warmed_up, start, peak, clock.step_seconds())

    @property
    def steps_per_s(self) -> float:
        return self.steps / self.seconds if self.seconds else 0.0

    @property
    def images_per_s(self) -> float:
        return self.steps_per_s * self.batch_size

    @property
    def median_step_s(self) -> float:
        return statistics.median(self.step_seconds) if self.step_seconds else 0.0


@contextmanager
def process_defaults() -> Iterator[None]:
    """Run a block, then put back the global backend switches it may have flipped (TF32, cuDNN
    autotuning), so each run starts from the process's defaults rather than the last run's choices."""
    saved = (
        torch.backends.cuda.matmul.allow_tf32,
        torch.backends.cudnn.allow_tf32,
        torch.backends.cudnn.benchmark,
        torch.get_float32_matmul_precision(),
    )
    try:
        yield
    finally:
        matmul_tf32, cudnn_tf32, benchmark, precision = saved
        torch.set_float32_matmul_precision(precision)
        torch.backends.cuda.matmul.allow_tf32 = matmul_tf32
        torch.backends.cudnn.allow_tf32 = cudnn_tf32
        torch.backends.cudnn.benchmark = benchmark


def release_memory(device: str) -> None:
    """Free what the last run left: Python cycles, the CUDA cache, glibc's free lists (for RSS)."""
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: RSS may include memory freed by an earlier run
        pass


def reset_peak_memory(device: str) -> int:
    """Start a fresh peak (CUDA's counter, or the kernel's RSS high-water mark); returns what is in use."""
    release_memory(device)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()
    try:
        _CLEAR_REFS.write_text("5")  # "5" resets VmHWM to the current RSS (Linux >= 4.0)
    except OSError:
        pass  # then peak_memory() is the process's peak so far
    return _status_bytes("VmRSS:") or 0


def peak_memory(device: str) -> int:
    """Bytes: CUDA max allocated since the reset, or the process's peak RSS."""
    if device == "cuda":
        return torch.cuda.max_memory_allocated()
    peak = _status_bytes("VmHWM:")
    return peak if peak is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _status_bytes(key: str) -> int | None:
    """A kB line of /proc/self/status, in bytes (Linux only)."""
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def count_flops(step: Callable[[], Any], device: str) -> int:
    """FLOPs of one call of `step` (a forward and backward), as FlopCounterMode counts them.

    On CPU, SDPA runs a fused kernel FlopCounterMode has no formula for; the math backend computes
    the same products as matmuls, which it counts.
    """
    backend = nullcontext() if device == "cuda" else sdpa_kernel(SDPBackend.MATH)
    with backend, FlopCounterMode(display=False) as counter:
        step()
    return int(counter.get_total_flops())


def peak_flops(device: str, override: float | None = None) -> tuple[float | None, str]:
    """(dense bf16 peak FLOP/s, device name); None where unknown (CPU, or a GPU not in the table)."""
    if device != "cuda":
        return override, "cpu"
    name = torch.cuda.get_device_name()
    if override:
        return override, name
    for part, flops in PEAK_BF16_FLOPS:
        if part in name:
            return flops, name
    return None, name
