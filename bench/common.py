"""What every benchmark script shares: naming the device and waiting for it."""

import platform

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
