"""Use a fast BLAS/LAPACK under MLX on Linux CPUs.

The `mlx[cpu]` wheel bundles the reference BLAS (~6 GFLOP/s fp32 matmul here). Loading an optimized
libblas/liblapack with RTLD_GLOBAL *before* `mlx.core` is imported makes MLX's calls resolve to it
(~180 GFLOP/s with OpenBLAS). This must run before anything imports mlx; `forge_mlx/__init__` does it.
"""

from __future__ import annotations

import ctypes
import os
import sys
from dataclasses import dataclass

# Searched in order; the first folder holding both libraries wins.
CANDIDATE_DIRS = (
    "/usr/lib/x86_64-linux-gnu/openblas-pthread",
    "/usr/lib/aarch64-linux-gnu/openblas-pthread",
    "/usr/lib64/openblas-pthreads",
    "/usr/lib/x86_64-linux-gnu/openblas-openmp",
    "/usr/lib/aarch64-linux-gnu/openblas-openmp",
)
DISABLE_ENV = "FORGE_MLX_NO_FAST_BLAS"
DIR_ENV = "FORGE_MLX_BLAS_DIR"


@dataclass(frozen=True)
class BlasStatus:
    loaded: bool
    library: str | None
    reason: str


_status = BlasStatus(False, None, "not attempted")


def find_fast_blas() -> tuple[str, str] | None:
    """Return (libblas, liblapack) paths of an optimized BLAS on this machine, or None."""
    dirs = [os.environ[DIR_ENV]] if os.environ.get(DIR_ENV) else list(CANDIDATE_DIRS)
    for folder in dirs:
        blas = os.path.join(folder, "libblas.so.3")
        lapack = os.path.join(folder, "liblapack.so.3")
        if os.path.exists(blas) and os.path.exists(lapack):
            return blas, lapack
    return None


def preload() -> BlasStatus:
    """Load the fast BLAS globally if we are on Linux, mlx is not imported yet, and one exists."""
    global _status
    if _status.loaded:
        return _status
    if not sys.platform.startswith("linux"):
        _status = BlasStatus(False, None, "not needed: MLX uses Accelerate/Metal on macOS")
    elif os.environ.get(DISABLE_ENV):
        _status = BlasStatus(False, None, f"disabled by {DISABLE_ENV}")
    elif "mlx.core" in sys.modules:
        _status = BlasStatus(False, None, "mlx was imported before forge_mlx; import forge_mlx first")
    elif (found := find_fast_blas()) is None:
        _status = BlasStatus(False, None, "no OpenBLAS found (Debian/Ubuntu: apt-get install libopenblas0-pthread)")
    else:
        try:
            for lib in found:
                ctypes.CDLL(lib, mode=ctypes.RTLD_GLOBAL)
            _status = BlasStatus(True, found[0], "preloaded before mlx")
        except OSError as exc:
            _status = BlasStatus(False, None, f"could not load {found[0]}: {exc}")
    return _status


def status() -> BlasStatus:
    return _status
