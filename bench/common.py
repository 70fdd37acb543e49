"""What every benchmark script shares: naming the device, waiting for it, writing results."""

import json
import platform
import re
from pathlib import Path

import torch


def device_name(device: torch.device | None = None) -> str:
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


# Dense bf16/fp16 tensor-core peaks (TFLOP/s, without 2:4 sparsity) from NVIDIA's data sheets, by
# whole words of torch.cuda.get_device_name in lower case, the first match winning: the
# denominator of a model FLOPs utilisation.
PEAK_TFLOPS = (("h100 pcie", 756.0), ("h100 nvl", 835.0), ("h100", 989.4), ("h200", 989.4),
               ("a100", 312.0), ("l40s", 362.0), ("l4", 121.0), ("t4", 65.0))


def peak_tflops(device: torch.device) -> float | None:
    """The GPU's dense bf16/fp16 peak (PEAK_TFLOPS), or None (a CPU, a GPU not listed)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device).lower()
    return next((tflops for words, tflops in PEAK_TFLOPS if re.search(rf"\b{words}\b", name)), None)


def sync(device: torch.device) -> None:
    """Wait for queued GPU work so that a timer measures it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def write_json(path, result) -> None:
    """Write a result file (creating its folder), as every script under bench/ does."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(result, indent=2) + "\n")
