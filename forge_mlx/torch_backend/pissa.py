"""PiSSA init in torch (Meng et al. 2024, arXiv:2404.02948), the same math as forge_mlx/pissa.py.

lora_a (in, r), lora_b (r, out), y = residual(x) + scale * (x @ lora_a) @ lora_b. All fp32 on the CPU (as MLX
runs its svd, qr and lu); the randomized SVD draws its sketch with MLX's RNG (mlx_random), so both backends sketch
the same subspace and the factors agree up to the signs of singular vectors (their products agree).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch

from forge_mlx.torch_backend import mlx_random

# Extra sketch columns for the randomized SVD; Halko et al. (2009, sec. 4.2) find p = 5..10 enough. PEFT's
# pissa_niter_N samples none (torch.svd_lowrank with q = r): adapter.oversample = 0.
OVERSAMPLE = 10


def _orthonormal(x: torch.Tensor) -> torch.Tensor:
    return torch.linalg.qr(x)[0]


def _lu_basis(x: torch.Tensor) -> torch.Tensor:
    """MLX's LU basis lower[rows] (x = lower[rows] @ upper); torch.linalg.lu would build an (m, m) permutation."""
    lu, pivots, _ = torch.linalg.lu_factor_ex(x)  # getrf: row i swapped with row pivots[i] - 1, in order
    rows = np.arange(x.shape[0])
    for i, j in enumerate(pivots.tolist()):
        rows[[i, j - 1]] = rows[[j - 1, i]]
    basis = torch.empty_like(x)
    basis[torch.from_numpy(rows)] = torch.tril(lu, -1) + torch.eye(*x.shape, dtype=x.dtype)
    return basis


def randomized_svd(
    w: torch.Tensor, rank: int, niter: int, seed: int = 0, oversample: int = OVERSAMPLE
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-`rank` SVD by subspace iteration (Halko et al. 2009, alg. 4.4 and 5.1), as PEFT's pissa_niter_N.

    The power iterations renormalise with LU, as fbpca and scikit-learn do, and only the last basis with QR.
    """
    out_dims, in_dims = w.shape
    sketch = min(rank + oversample, out_dims, in_dims)
    omega = torch.from_numpy(mlx_random.normal((in_dims, sketch), mlx_random.key(seed)))  # (in, q)
    span = w @ omega  # (out, q)
    for _ in range(niter):
        span = w @ _lu_basis(w.T @ _lu_basis(span))
    basis = _orthonormal(span)  # (out, q)
    u, s, vt = torch.linalg.svd(basis.T @ w, full_matrices=False)  # (q, q), (q,), (q, in)
    return basis @ u[:, :rank], s[:rank], vt[:rank]


def principal_svd(
    w: torch.Tensor, rank: int, niter: int | None = None, seed: int = 0, oversample: int = OVERSAMPLE
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """u_r (out, r), s_r (r,), vt_r (r, in): exact if niter is None, else randomized with niter iterations and
    rank + oversample sketch columns."""
    if niter is not None:
        return randomized_svd(w, rank, niter, seed, oversample)
    u, s, vt = torch.linalg.svd(w, full_matrices=False)
    return u[:, :rank], s[:rank], vt[:rank]


def _principal_factors(
    w: torch.Tensor, rank: int, scale: float, niter: int | None, seed: int, oversample: int
) -> tuple[torch.Tensor, torch.Tensor]:
    u, s, vt = principal_svd(w, rank, niter, seed, oversample)
    sqrt_s = torch.sqrt(s / scale)  # (r,): dividing by scale makes scale * a @ b the rank-r part for any alpha
    return (sqrt_s[:, None] * vt).T.contiguous(), (u * sqrt_s).T.contiguous()  # lora_a (in, r), lora_b (r, out)


def _residual(w: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scale: float) -> torch.Tensor:
    """w - scale * (lora_a @ lora_b).T in one BLAS call, without an (in, out) temporary read back transposed."""
    return torch.addmm(w, lora_b.T, lora_a.T, alpha=-scale)  # (out, in)


def pissa_factors(
    w: torch.Tensor, rank: int, scale: float, niter: int | None = None, seed: int = 0, oversample: int = OVERSAMPLE
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """lora_a (in, r), lora_b (r, out), residual (out, in); residual + scale * (lora_a @ lora_b).T = w."""
    w = w.detach().to("cpu", torch.float32)
    lora_a, lora_b = _principal_factors(w, rank, scale, niter, seed, oversample)
    return lora_a, lora_b, _residual(w, lora_a, lora_b, scale)


def lora_factors(in_dims: int, out_dims: int, rank: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """mlx-lm's LoRA init, the baseline: lora_a ~ U(+-1/sqrt(in)) (in, r), drawn as MLX draws it;
    lora_b = 0."""
    bound = 1 / math.sqrt(in_dims)
    lora_a = torch.from_numpy(mlx_random.uniform(-bound, bound, (in_dims, rank), mlx_random.key(seed)))
    return lora_a, torch.zeros(rank, out_dims)


def qpissa(
    w: torch.Tensor,
    rank: int,
    scale: float,
    quantize_dequantize: Callable[[torch.Tensor], torch.Tensor],
    iters: int,
    niter: int | None = None,
    seed: int = 0,
    oversample: int = OVERSAMPLE,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[float]]:
    """Multi-iteration QPiSSA (PiSSA paper, appendix E): refit the factors to what quantizing W_res loses.

    Iteration t takes the principal factors of W - Q(W_res) (of W at t = 1), sets W_res = W - scale * a @ b
    and records ||W - Q(W_res) - scale * a @ b||_F / ||W||_F. Returns the best iterate and every error.
    """
    if iters < 1:
        raise ValueError(f"qpissa needs iters >= 1, got {iters}")
    w = w.detach().to("cpu", torch.float32)
    norm = torch.linalg.norm(w)
    quantized = torch.zeros_like(w)  # Q(W_res) of the previous iterate
    best = ()
    errors: list[float] = []
    for _ in range(iters):
        lora_a, lora_b = _principal_factors(w - quantized, rank, scale, niter, seed, oversample)
        residual = _residual(w, lora_a, lora_b, scale)
        quantized = quantize_dequantize(residual).float()
        errors.append((torch.linalg.norm(residual - quantized) / norm).item())  # W - Q(W_res) - scale * a @ b
        if errors[-1] <= min(errors):
            best = (lora_a, lora_b, residual)
    return *best, errors
