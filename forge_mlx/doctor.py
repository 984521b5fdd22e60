"""`forge-mlx doctor`: what this machine gives MLX (device, BLAS, a measured matmul rate) and whether torch is there."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import platform
import time

import mlx.core as mx

from forge_mlx import fastblas
from forge_mlx.models import device_memory_bytes


def matmul_gflops(n: int = 1024, dtype: mx.Dtype = mx.float32, repeats: int = 5) -> float:
    """Measured n x n matmul rate on the default device (the peak the training utilisation is compared with)."""
    a = mx.random.normal((n, n)).astype(dtype)
    b = mx.random.normal((n, n)).astype(dtype)
    mx.eval(a @ b)  # warm-up: kernel selection, thread pool start
    start = time.perf_counter()
    for _ in range(repeats):
        mx.eval(a @ b)
    seconds = (time.perf_counter() - start) / repeats
    return 2 * n**3 / seconds / 1e9


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def torch_report() -> dict:
    """torch's version and best device, without importing torch unless it is installed."""
    if importlib.util.find_spec("torch") is None:
        return {"installed": False}
    import torch

    device = "mps" if torch.backends.mps.is_available() else "cuda" if torch.cuda.is_available() else "cpu"
    return {"installed": True, "version": torch.__version__, "device": device}


def report(measure: bool = True) -> dict:
    blas = fastblas.status()
    gpu = mx.default_device() == mx.gpu
    info = {
        "platform": f"{platform.system()} {platform.machine()}",
        "python": platform.python_version(),
        "mlx": _version("mlx"),
        "mlx_lm": _version("mlx-lm"),
        "device": "gpu" if gpu else "cpu",
        "device_name": mx.device_info().get("device_name", ""),
        "device_memory_gb": round(device_memory_bytes() / 2**30, 1),
        "blas": blas.library if blas.loaded else ("Metal/Accelerate" if gpu else "bundled reference BLAS (slow)"),
        "blas_note": blas.reason,
        "torch": torch_report(),
    }
    if measure:
        info["matmul_fp32_gflops"] = round(matmul_gflops(), 1)
    return info


def format_report(info: dict) -> str:
    lines = [f"{key:20s} {value}" for key, value in info.items() if key != "torch"]
    torch = info["torch"]
    lines.append(
        f"{'torch':20s} "
        + (
            f"{torch['version']} ({torch['device']})"
            if torch["installed"]
            else "not installed (optional: pip install 'forge-mlx[torch]')"
        )
    )
    if not fastblas.status().loaded and info["device"] == "cpu":
        lines.append("WARNING: MLX runs on the bundled reference BLAS (~30x slower matmul). " + info["blas_note"])
    return "\n".join(lines)
