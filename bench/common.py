"""What every benchmark script shares: naming the device, waiting for it, writing results."""

import json
import platform
from pathlib import Path

import torch


def device_name(device: torch.device | None = None) -> str:
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def sync(device: torch.device) -> None:
    """Wait for queued GPU work so that a timer measures it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def write_json(path, result) -> None:
    """Write a result file (creating its folder), as every script under bench/ does."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(result, indent=2) + "\n")
