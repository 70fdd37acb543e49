"""What the machine's accelerator can do: the precision to compute in, and whether 2:4 kernels run.

Plain functions of a Device (is it CUDA, its compute capability, its name), so that every case
is tested on a CPU with made-up properties; `props(device)` reads the real ones.
- bfloat16 where the GPU has it natively (compute capability 8.0, Ampere, and newer);
- float16 on older GPUs (T4 is 7.5, V100 7.0): their bfloat16 is emulated and slow, and
  float16's narrow range is covered in training by accelerate's loss scaling
  (mixed_precision="fp16");
- float32 on a CPU.
"""

from __future__ import annotations

import os
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

AMPERE = (8, 0)  # native bfloat16 and the sparse tensor cores of 2:4 kernels start here


def on_zero_gpu() -> bool:
    """A ZeroGPU Space: the `spaces` package's own test (SPACES_ZERO_GPU). Merely having `spaces`
    installed means nothing: outside ZeroGPU its decorator does nothing."""
    return os.environ.get("SPACES_ZERO_GPU", "").lower() in ("1", "t", "true")


def cores() -> int:
    """The CPU cores this process may run on (a container's or taskset's share, not the machine's)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def cpu_threads(processes: int) -> int:
    """torch's CPU threads for each of `processes` processes that compute at once: an equal share
    of the cores. Each process's OpenMP pool takes every core by default; side by side, the pools
    spin against each other (two distillations on 2 cores: 9.5 tokens/s each with 2 threads,
    32-35 with 1, bench/results/threads.json)."""
    return max(1, cores() // max(1, processes))


# glibc gives a large block back to the kernel when it is freed (above its mmap threshold, or at
# the top of the heap), and the next training step faults the same amount in again, page by
# page: a distillation worker beside the app's server spent 24-27 s of 65 s in the kernel and
# ran at 84-106 tokens/s. Keeping freed memory for reuse (GLIBC_TUNABLES, read at a process's
# start) ran it at 144 tokens/s, with 4.7x fewer page faults from the command line. For the
# worker processes only: they give everything back when they exit; the long-lived server would
# hold its peak for good, and its own calls measured no faster with it.
KEEP_FREED_MEMORY = "glibc.malloc.mmap_threshold=4294967296:glibc.malloc.trim_threshold=17179869184"

# What computes at once in the app shares the cores: its worker processes and the server's own
# computing threads (generate, importance, prune, compare), each with cpu_threads(how many run).
# Teams of OpenMP threads that add up to more than the cores spin against each other (the load
# test's generate p90: 6.2 s with the server's threads on every core, 2.1 s sharing them,
# bench/results/load.json). The server writes each worker's share into a file of its own
# whenever anything starts or ends; a worker takes it at its next safe point (take_thread_share,
# called with should_stop in the job's thread: OpenMP's thread count is set per thread, so only
# the thread that computes can change its own); a thread of the server takes it as it starts,
# and a job at each should_stop (ui/jobs).
THREADS_ENV = "COMPACT_THREADS_FILE"


class CoreShares:
    """What computes at once: worker processes (each with its threads file) and threads of this
    process; each gets cpu_threads(how many), or `fixed` threads whatever runs (a server started
    with OMP_NUM_THREADS: its workers inherit that and write no files)."""

    def __init__(self, fixed: int | None = None):
        self._lock = threading.Lock()
        self._running: dict[object, Path | None] = {}  # key -> threads file; None: a thread of this process
        self.fixed = fixed

    def join(self, key, path: str | os.PathLike | None = None) -> int:
        """A worker (path: its threads file) or a thread of this process (None) starts
        computing: every worker's file is rewritten. Returns the new share."""
        with self._lock:
            self._running[key] = None if path is None else Path(path)
            return self._write()

    def leave(self, key) -> None:
        with self._lock:
            if key in self._running:
                del self._running[key]
                self._write()

    def share(self) -> int:
        return self.fixed or cpu_threads(len(self._running))

    def take(self) -> None:
        """The calling thread's torch threads become the share now."""
        share = self.share()
        if share != torch.get_num_threads():
            torch.set_num_threads(share)

    @contextmanager
    def computing(self):
        """The calling thread computes inside: counted, and given its share as it starts; its
        own count comes back after (a server thread serves other events next)."""
        key, before = object(), torch.get_num_threads()
        self.join(key)
        try:
            self.take()
            yield
        finally:
            self.leave(key)
            torch.set_num_threads(before)

    def _write(self) -> int:
        share = self.share()
        for path in self._running.values():
            if path is not None:
                part = path.with_name(path.name + ".part")
                part.write_text(str(share))
                os.replace(part, path)  # whole: a worker never reads half a number
        return share


def omp_threads() -> int | None:
    """The OMP_NUM_THREADS this process was started with, if any (its first level's number)."""
    try:
        return int(os.environ.get("OMP_NUM_THREADS", "").split(",")[0]) or None
    except ValueError:
        return None


def take_thread_share(path: str | os.PathLike) -> int | None:
    """Set torch's CPU threads (of the calling thread) to the number in `path` when it differs;
    returns that number then, else None (unchanged, or no readable file)."""
    try:
        share = int(Path(path).read_text())
    except (OSError, ValueError):
        return None
    if share < 1 or share == torch.get_num_threads():
        return None
    torch.set_num_threads(share)
    return share


@dataclass(frozen=True)
class Device:
    is_cuda: bool
    capability: tuple[int, int] = (0, 0)
    name: str = "cpu"


def props(device: torch.device | str) -> Device:
    """The properties of a real device."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return Device(False, name=device.type)
    return Device(True, tuple(torch.cuda.get_device_capability(device)), torch.cuda.get_device_name(device))


def compute_dtype(dev: Device) -> torch.dtype:
    """The dtype models run in on this device when none is asked for."""
    if not dev.is_cuda:
        return torch.float32
    return torch.bfloat16 if dev.capability >= AMPERE else torch.float16


def mixed_precision(dtype: torch.dtype) -> str:
    """accelerate's mixed_precision for a compute dtype ("fp16" brings its loss scaling)."""
    return {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, "no")


def sparse_kernels(dev: Device) -> tuple[bool, str]:
    """Whether torch's 2:4 semi-structured kernels run here, and if not, why (one sentence)."""
    if not dev.is_cuda:
        return False, (f"2:4 sparse kernels need a CUDA GPU, not the {dev.name} "
                       "(the sparse checkpoint still runs, with dense kernels)")
    if dev.capability < AMPERE:
        major, minor = dev.capability
        return False, (f"2:4 sparse kernels need compute capability 8.0 (Ampere) or newer; {dev.name} "
                       f"has {major}.{minor} (the sparse checkpoint still runs, with dense kernels)")
    return True, ""


def summary(dev: Device) -> str:
    """One line for people: the device, the precision it computes in, and the 2:4 kernels."""
    dtype = str(compute_dtype(dev)).removeprefix("torch.")
    if dev.is_cuda:
        major, minor = dev.capability
        where = f"{dev.name} (compute capability {major}.{minor})"
        if dtype == "float16":
            dtype += " (training: fp32 master weights, loss scaling)"
    else:
        where = dev.name
    ok, why = sparse_kernels(dev)
    return f"{where}: {dtype}; " + ("2:4 sparse kernels available" if ok else why)


# The app's starting sizes by device. On a CPU (a 2-vCPU Space, a laptop) each click with the default
# model answers in about a minute: importance 8 x 128 tokens, 4,096 distillation tokens (65,536, the
# command line's default, took about 11 minutes on a 2-vCPU Space) in batches of 4 x 128, so that
# the loss curve has 8 steps rather than 2 (and 137 tokens/s against 112-121 at 8 x 256). On a GPU
# the same clicks take seconds, so the sizes scale up toward the command line's. Every field stays
# editable.
APP_SIZES = {
    "cpu": {"importance_samples": 8, "importance_seq_len": 128, "train_tokens": 4096,
            "train_seq_len": 128, "train_batch": 4,
            "sparsify_samples": 8, "experiment_tokens": 1024, "experiment_samples": 8,
            "experiment_eval_tokens": 1024},
    "cuda": {"importance_samples": 64, "importance_seq_len": 512, "train_tokens": 65536,
             "train_seq_len": 256, "train_batch": 8,
             "sparsify_samples": 128, "experiment_tokens": 16384, "experiment_samples": 32,
             "experiment_eval_tokens": 4096},
}


def app_sizes(dev: Device) -> dict:
    """The app's default job sizes for this device (APP_SIZES)."""
    return APP_SIZES["cuda" if dev.is_cuda else "cpu"]
