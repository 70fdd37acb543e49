"""Server settings, read once from the environment (documented in the README).

Everything that an operator of a public deployment may want to change lives here, with safe
defaults: remote code and pickle weights never load unless switched on.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from compact.errors import UserError


def _flag(name: str, default: bool = False) -> bool:
    value = os.environ.get(name)
    if value is None:
        return default
    return value.strip().lower() in ("1", "true", "yes", "on")


def _int(name: str, default: int | None) -> int | None:
    value = os.environ.get(name)
    if value is None or not value.strip():
        return default
    try:
        return int(value)
    except ValueError:
        raise UserError(f"{name} must be an integer, got '{value}'") from None


@dataclass(frozen=True)
class Settings:
    # None: not set here, so Gradio's own GRADIO_SERVER_NAME / GRADIO_SERVER_PORT (which a
    # Gradio Space sets) or its defaults (127.0.0.1, 7860) apply.
    host: str | None = None
    port: int | None = None
    data_dir: Path = Path("data")
    # Pending requests beyond this are refused with a clear message; 16 refused the 19th of 20 users
    # (bench/load_test.py), each of whom may have one heavy request waiting.
    queue_size: int = 64
    gpu_concurrency: int = 1  # events at once in each interactive pool: quick (load, generate), heavy
    workers: int = 1  # long jobs (distill, sparsify, experiments) in worker processes at once; 0: in-process
    worker_nice: int = 10  # added to the workers' niceness, so interactive calls get the CPU first
    max_upload_mb: int = 200
    auth: tuple[str, str] | None = None  # "user:password" in COMPACT_AUTH
    allow_remote_code: bool = False
    allow_pickle: bool = False
    allowed_dirs: tuple[Path, ...] = field(default_factory=tuple)  # local model/data folders users may name
    max_age_hours: int = 72  # artifacts older than this are cleaned
    disk_quota_gb: int = 20  # and the oldest are cleaned beyond this
    session_quota_gb: float = 5.0  # one visitor's outputs; a job that would pass it is refused first
    model_cache_gb: float = 4.0  # memory bound of the shared model cache
    shared_runs: bool = False  # every visitor sees every run (a private, single-team server)
    challenge_password: str | None = None  # opens the workshop challenge's host view


def _available_gib() -> float:
    """Free memory of this machine (MemAvailable), or 0 where /proc/meminfo is missing."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 2**20
    except (OSError, ValueError, IndexError):
        pass
    return 0.0


def default_workers() -> int:
    """Long jobs at once, from the device and its free memory: on a CPU one per 4 GiB free, at
    most 2 (they share the cores); on CUDA one per 8 GiB free GPU memory, at most 2 per GPU.
    0 (long jobs in the server process) on ZeroGPU, where only the server's process gets a GPU."""
    from compact.hardware import on_zero_gpu

    if on_zero_gpu():
        return 0
    import torch

    if torch.cuda.is_available():
        free = sum(torch.cuda.mem_get_info(i)[0] for i in range(torch.cuda.device_count())) / 2**30
        return max(1, min(2 * torch.cuda.device_count(), int(free // 8)))
    return max(1, min(2, int(_available_gib() // 4)))


def load() -> Settings:
    auth = os.environ.get("COMPACT_AUTH")
    if auth and ":" not in auth:
        raise UserError("COMPACT_AUTH must be user:password")
    data_dir = Path(os.environ.get("COMPACT_DATA", "data")).resolve()
    workers = _int("COMPACT_WORKERS", -1)
    extra = [Path(p).expanduser().resolve()
             for p in os.environ.get("COMPACT_ALLOWED_DIRS", "").split(":") if p]
    return Settings(
        host=os.environ.get("COMPACT_HOST") or None,
        port=_int("COMPACT_PORT", None),
        data_dir=data_dir,
        queue_size=_int("COMPACT_QUEUE_SIZE", 64),
        gpu_concurrency=_int("COMPACT_GPU_CONCURRENCY", 1),
        workers=workers if workers >= 0 else default_workers(),
        worker_nice=_int("COMPACT_WORKER_NICE", 10),
        max_upload_mb=_int("COMPACT_MAX_UPLOAD_MB", 200),
        auth=tuple(auth.split(":", 1)) if auth else None,
        allow_remote_code=_flag("COMPACT_ALLOW_REMOTE_CODE"),
        allow_pickle=_flag("COMPACT_ALLOW_PICKLE"),
        allowed_dirs=(data_dir, *extra),
        max_age_hours=_int("COMPACT_MAX_AGE_HOURS", 72),
        disk_quota_gb=_int("COMPACT_DISK_QUOTA_GB", 20),
        session_quota_gb=float(os.environ.get("COMPACT_SESSION_QUOTA_GB", "5")),
        model_cache_gb=float(os.environ.get("COMPACT_MODEL_CACHE_GB", "4")),
        shared_runs=_flag("COMPACT_SHARED_RUNS"),
        challenge_password=os.environ.get("COMPACT_CHALLENGE_PASSWORD") or None,
    )


def safe_path(path: str, allowed: tuple[Path, ...]) -> Path:
    """Resolve a user-given path (symlinks and .. included); it must stay inside an allowed folder."""
    resolved = Path(path).expanduser().resolve()
    for root in allowed:
        if resolved == root or root in resolved.parents:
            return resolved
    raise UserError(f"'{path}' is outside the folders this server allows")
