"""PiSSA init (Meng et al. 2024, arXiv:2404.02948): adapters from the principal singular directions of W.

Factors as mlx-lm's LoRALinear names them: lora_a (in, r), lora_b (r, out),
y = residual(x) + scale * (x @ lora_a) @ lora_b. All fp32; MLX runs svd, qr and lu on the CPU stream only.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import mlx.core as mx

# Extra sketch columns for the randomized SVD; Halko et al. (2009, sec. 4.2) find p = 5..10 enough. PEFT's
# pissa_niter_N samples none (torch.svd_lowrank with q = r): adapter.oversample = 0.
OVERSAMPLE = 10


def thin_svd(w: mx.array) -> tuple[mx.array, mx.array, mx.array]:
    """u (out, k), s (k,), vt (k, in) with k = min(out, in); MLX's svd returns square U and V, so QR first."""
    out_dims, in_dims = w.shape
    if out_dims < in_dims:
        u, s, vt = thin_svd(w.T)
        return vt.T, s, u.T
    if out_dims > in_dims:
        q, r = mx.linalg.qr(w, stream=mx.cpu)  # (out, in), (in, in)
        u, s, vt = mx.linalg.svd(r, stream=mx.cpu)
        return q @ u, s, vt
    return mx.linalg.svd(w, stream=mx.cpu)


def _orthonormal(x: mx.array) -> mx.array:
    return mx.linalg.qr(x, stream=mx.cpu)[0]


def _lu_basis(x: mx.array) -> mx.array:
    """A well-conditioned basis of x's columns for half a QR's cost: x = lower[rows] @ upper (partial pivoting)."""
    rows, lower, _ = mx.linalg.lu(x, stream=mx.cpu)
    return lower[rows]


def randomized_svd(
    w: mx.array, rank: int, niter: int, seed: int = 0, oversample: int = OVERSAMPLE
) -> tuple[mx.array, mx.array, mx.array]:
    """Top-`rank` SVD by subspace iteration (Halko et al. 2009, alg. 4.4 and 5.1), as PEFT's pissa_niter_N.

    The power iterations renormalise with LU, as fbpca and scikit-learn do, and only the last basis with QR.
    w.T @ x runs as (x.T @ w).T: OpenBLAS streams a large row-major w twice as fast as the right operand.
    """
    out_dims, in_dims = w.shape
    sketch = min(rank + oversample, out_dims, in_dims)
    omega = mx.random.normal((in_dims, sketch), key=mx.random.key(seed))  # (in, q)
    span = w @ omega  # (out, q)
    for _ in range(niter):
        span = w @ _lu_basis((_lu_basis(span).T @ w).T)  # (in, q) basis of w.T @ span, then (out, q)
    basis = _orthonormal(span)  # (out, q)
    u, s, vt = thin_svd(basis.T @ w)  # (q, q), (q,), (q, in)
    return basis @ u[:, :rank], s[:rank], vt[:rank]


def principal_svd(
    w: mx.array, rank: int, niter: int | None = None, seed: int = 0, oversample: int = OVERSAMPLE
) -> tuple[mx.array, mx.array, mx.array]:
    """u_r (out, r), s_r (r,), vt_r (r, in): exact if niter is None, else randomized with niter iterations and
    rank + oversample sketch columns."""
    if niter is not None:
        return randomized_svd(w, rank, niter, seed, oversample)
    u, s, vt = thin_svd(w)
    return u[:, :rank], s[:rank], vt[:rank]


def _principal_factors(
    w: mx.array, rank: int, scale: float, niter: int | None, seed: int, oversample: int
) -> tuple[mx.array, mx.array]:
    u, s, vt = principal_svd(w, rank, niter, seed, oversample)
    sqrt_s = mx.sqrt(s / scale)  # (r,): dividing by scale makes scale * a @ b the rank-r part for any alpha
    return (sqrt_s[:, None] * vt).T, (u * sqrt_s).T  # lora_a (in, r), lora_b (r, out)


def _residual(w: mx.array, lora_a: mx.array, lora_b: mx.array, scale: float) -> mx.array:
    """w - scale * (lora_a @ lora_b).T in one BLAS call, without an (in, out) temporary read back transposed."""
    return mx.addmm(w, lora_b.T, lora_a.T, alpha=-scale)  # (out, in)


def pissa_factors(
    w: mx.array, rank: int, scale: float, niter: int | None = None, seed: int = 0, oversample: int = OVERSAMPLE
) -> tuple[mx.array, mx.array, mx.array]:
    """lora_a (in, r), lora_b (r, out), residual (out, in); residual + scale * (lora_a @ lora_b).T = w."""
    w = w.astype(mx.float32)
    lora_a, lora_b = _principal_factors(w, rank, scale, niter, seed, oversample)
    return lora_a, lora_b, _residual(w, lora_a, lora_b, scale)


def lora_factors(in_dims: int, out_dims: int, rank: int, seed: int = 0) -> tuple[mx.array, mx.array]:
    """mlx-lm's LoRA init, the baseline: lora_a ~ U(+-1/sqrt(in)) (in, r), lora_b = 0 (r, out)."""
    bound = 1 / math.sqrt(in_dims)
    lora_a = mx.random.uniform(-bound, bound, (in_dims, rank), key=mx.random.key(seed))
    return lora_a, mx.zeros((rank, out_dims))


def qpissa(
    w: mx.array,
    rank: int,
    scale: float,
    quantize_dequantize: Callable[[mx.array], mx.array],
    iters: int,
    niter: int | None = None,
    seed: int = 0,
    oversample: int = OVERSAMPLE,
) -> tuple[mx.array, mx.array, mx.array, list[float]]:
    """Multi-iteration QPiSSA (PiSSA paper, appendix E): refit the factors to what quantizing W_res loses.

    Iteration t takes the principal factors of W - Q(W_res) (of W at t = 1), sets W_res = W - scale * a @ b
    and records ||W - Q(W_res) - scale * a @ b||_F / ||W||_F. Returns the best iterate and every error.
    """
    if iters < 1:
        raise ValueError(f"qpissa needs iters >= 1, got {iters}")
    w = w.astype(mx.float32)
    norm = mx.linalg.norm(w)
    quantized = mx.zeros_like(w)  # Q(W_res) of the previous iterate
    best = ()
    errors: list[float] = []
    for _ in range(iters):
        lora_a, lora_b = _principal_factors(w - quantized, rank, scale, niter, seed, oversample)
        residual = _residual(w, lora_a, lora_b, scale)
        quantized = quantize_dequantize(residual).astype(mx.float32)
        errors.append((mx.linalg.norm(residual - quantized) / norm).item())  # W - Q(W_res) - scale * a @ b
        if errors[-1] <= min(errors):
            best = (lora_a, lora_b, residual)
    return *best, errors
