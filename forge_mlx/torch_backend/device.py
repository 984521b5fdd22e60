"""Where the torch backend runs (MPS, else CUDA, else CPU, or FORGE_MLX_TORCH_DEVICE) and in which dtype."""

from __future__ import annotations

import os
import resource
import sys
from pathlib import Path

import torch

from forge_mlx.errors import ForgeError

DEVICE_ENV = "FORGE_MLX_TORCH_DEVICE"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def pick_device(name: str | None = None) -> torch.device:
    """`name` (e.g. "cuda:1"), else $FORGE_MLX_TORCH_DEVICE, else the first of MPS, CUDA, CPU that works."""
    name = name or os.environ.get(DEVICE_ENV)
    if not name:
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
        torch.zeros(1, device=device)
    except (RuntimeError, AssertionError) as exc:
        raise ForgeError(
            f"torch device '{name}' is not usable here ({str(exc).splitlines()[0]})",
            where=DEVICE_ENV if name == os.environ.get(DEVICE_ENV) else "device",
            hint="use cpu, cuda, cuda:N or mps, or unset it to pick automatically",
        ) from None
    return device


def compute_dtype(setting: str, device: torch.device) -> torch.dtype:
    """fp32 on CPU (as the MLX side: no fast bf16 matmul there), bf16 on MPS and on CUDA cards that have
    it."""
    if setting != "auto":
        return DTYPES[setting]
    if device.type == "mps" or (device.type == "cuda" and torch.cuda.is_bf16_supported()):
        return torch.bfloat16
    return torch.float32


def peak_memory_bytes(device: torch.device) -> int:
    """Peak memory so far: the allocator's on CUDA, the driver's current allocation on MPS, the RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    if device.type == "mps":
        return torch.mps.driver_allocated_memory()
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024  # bytes on macOS, KiB on Linux


def device_memory_bytes(device: torch.device) -> int:
    """Memory the model can use: the card's on CUDA, Metal's recommended maximum on MPS, else physical RAM."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    if device.type == "mps":
        return torch.mps.recommended_max_memory()
    if sys.platform.startswith("linux"):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def synchronize(device: torch.device) -> None:
    """Wait for queued kernels, so a timer measures the work and not its launch."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    """The generators dropout draws from: the CPU's and the device's."""
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    elif device.type == "mps":
        state["mps"] = torch.mps.get_rng_state()
    return state


def set_rng_state(state: dict[str, torch.Tensor], device: torch.device) -> None:
    if "cpu" in state:
        torch.set_rng_state(state["cpu"])
    if "cuda" in state and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)
    if "mps" in state and device.type == "mps":
        torch.mps.set_rng_state(state["mps"])
