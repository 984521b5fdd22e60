"""PiSSA factors against numpy's SVD, randomized against exact SVD, and QPiSSA's error reduction."""

from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from forge_mlx.pissa import lora_factors, pissa_factors, principal_svd, qpissa, thin_svd

EPS32 = float(np.finfo(np.float32).eps)  # 1.19e-7
SMOLLM2 = Path("/work/main/models/SmolLM2-135M-Instruct/model.safetensors")


def spectrum_matrix(out_dims: int, in_dims: int, singular_values: np.ndarray, seed: int = 0) -> np.ndarray:
    """U diag(s) V^T with random orthonormal U, V: a matrix whose spectrum the test chooses (float64)."""
    rng = np.random.default_rng(seed)
    k = len(singular_values)
    u = np.linalg.qr(rng.standard_normal((out_dims, k)))[0]
    v = np.linalg.qr(rng.standard_normal((in_dims, k)))[0]
    return (u * singular_values) @ v.T


def rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def cos_principal_angles(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Cosines of the principal angles between the column spaces of x and y (Bjorck & Golub 1973)."""
    qx, qy = np.linalg.qr(x)[0], np.linalg.qr(y)[0]
    return np.linalg.svd(qx.T @ qy, compute_uv=False)


@pytest.mark.parametrize("shape", [(48, 80), (80, 48), (64, 64)])
def test_thin_svd_matches_numpy(shape):
    w = np.random.default_rng(1).standard_normal(shape).astype(np.float32)
    u, s, vt = (np.array(t, dtype=np.float64) for t in thin_svd(mx.array(w)))
    k = min(shape)
    assert u.shape == (shape[0], k) and vt.shape == (k, shape[1])
    # fp32 LAPACK: backward error ~ eps * ||W|| * small multiple of n; 1e-5 leaves 2 orders for n = 80.
    assert rel((u * s) @ vt, w) < 1e-5
    assert np.allclose(s, np.linalg.svd(w.astype(np.float64), compute_uv=False), rtol=1e-5, atol=1e-5)
    assert np.allclose(u.T @ u, np.eye(k), atol=1e-5) and np.allclose(vt @ vt.T, np.eye(k), atol=1e-5)


@pytest.mark.parametrize("shape", [(48, 80), (80, 48)])
@pytest.mark.parametrize("alpha_of_rank", [lambda r: r, lambda r: 2 * r, lambda r: 16, lambda r: 0.5 * r])
def test_pissa_reconstructs_w_and_matches_numpy_svd(shape, alpha_of_rank):
    rank = 6  # alphas r, 2r, 16, r/2 are 6, 12, 16, 3: four distinct scales
    scale = alpha_of_rank(rank) / rank
    w = spectrum_matrix(*shape, 0.85 ** np.arange(min(shape))).astype(np.float32)
    lora_a, lora_b, residual = pissa_factors(mx.array(w), rank, scale)
    a, b, res = (np.array(t, dtype=np.float64) for t in (lora_a, lora_b, residual))
    assert a.shape == (shape[1], rank) and b.shape == (rank, shape[0]) and res.shape == shape

    # residual = W - scale * (a @ b).T in fp32: the fp32 product sums r terms (~sqrt(r) roundings of eps)
    # and the subtraction rounds once more, so the float64 reconstruction is within ~eps * (sqrt(r) + 1) of W.
    recon = res + scale * (a @ b).T
    assert rel(recon, w) < 1e-6 * np.sqrt(rank)

    # scale * a @ b is numpy's rank-r truncation U_r S_r V_r^T (products, so signs do not matter). Float32 SVD
    # perturbs the top-r subspace by ~eps * ||W|| / (s_r - s_r+1) = eps / (0.85^6 * 0.15) ~ 2e-6; allow 2e-5.
    u, s, vt = np.linalg.svd(w.astype(np.float64))
    truncation = (u[:, :rank] * s[:rank]) @ vt[:rank]
    assert rel(scale * (a @ b).T, truncation) < 2e-5
    # PiSSA splits S_r/scale evenly: a^T a = b b^T = diag(S_r / scale) (sign-free).
    assert np.allclose(a.T @ a, np.diag(s[:rank] / scale), atol=1e-5 * s[0] / scale)
    assert np.allclose(b @ b.T, np.diag(s[:rank] / scale), atol=1e-5 * s[0] / scale)


@pytest.mark.parametrize("shape", [(96, 128), (128, 96)])
def test_randomized_svd_spans_the_principal_subspace(shape):
    # Spectrum decaying 0.8x per direction: with r = 8, oversampling p = 10 and q = 4 power iterations,
    # Halko et al. (2009, sec. 10.4) bound the subspace error by ~(s_r+p+1 / s_r)^(2q+1) = 0.8^(11*9) ~ 1e-10,
    # so every principal angle's cosine is 1 up to fp32 round-off (0.99 leaves room for an unlucky sketch);
    # the products then agree to fp32 round-off too (~1e-6 seen; 1e-4 allowed).
    rank = 8
    w = spectrum_matrix(*shape, 0.8 ** np.arange(96), seed=3).astype(np.float32)
    exact = [np.array(t, dtype=np.float64) for t in principal_svd(mx.array(w), rank)]
    sketch = [np.array(t, dtype=np.float64) for t in principal_svd(mx.array(w), rank, niter=4, seed=7)]
    assert cos_principal_angles(exact[0], sketch[0]).min() >= 0.99
    assert cos_principal_angles(exact[2].T, sketch[2].T).min() >= 0.99
    lora_a, lora_b, _ = pissa_factors(mx.array(w), rank, 2.0, niter=4, seed=7)
    product = 2.0 * (np.array(lora_a, dtype=np.float64) @ np.array(lora_b, dtype=np.float64)).T
    assert rel(product, (exact[0] * exact[1]) @ exact[2]) < 1e-4


@pytest.mark.parametrize("shape", [(96, 128), (128, 96)])
def test_randomized_svd_of_a_rank_deficient_matrix(shape):
    # W of exact rank 5 < the sketch's 18 columns: the LU renormalisation meets exactly singular blocks (zero
    # pivots) and must still keep a full basis. The top 8 of a rank-5 W is W itself, so scale * a @ b rebuilds
    # W up to fp32 round-off (~3e-7 seen; 1e-5 allowed) and singular values 6..8 are round-off (< 1e-5 s_1).
    rng = np.random.default_rng(4)
    w = (rng.standard_normal((shape[0], 5)) @ rng.standard_normal((5, shape[1]))).astype(np.float32)
    _, s, _ = (np.array(t, dtype=np.float64) for t in principal_svd(mx.array(w), 8, niter=4))
    lora_a, lora_b, residual = (np.array(t, dtype=np.float64) for t in pissa_factors(mx.array(w), 8, 2.0, niter=4))
    assert rel(2.0 * (lora_a @ lora_b).T, w) < 1e-5
    assert np.abs(residual).max() < 1e-5 * np.abs(w).max()
    assert np.allclose(s[:5], np.linalg.svd(w.astype(np.float64), compute_uv=False)[:5], rtol=1e-5)
    assert s[5:].max() < 1e-5 * s[0]


def test_randomized_svd_is_seeded():
    w = mx.array(spectrum_matrix(40, 30, 0.9 ** np.arange(30)).astype(np.float32))
    first, again = pissa_factors(w, 4, 1.0, niter=2, seed=5), pissa_factors(w, 4, 1.0, niter=2, seed=5)
    assert all(np.array_equal(np.array(x), np.array(y)) for x, y in zip(first, again, strict=True))


def test_lora_factors_are_mlx_lm_init():
    lora_a, lora_b = lora_factors(100, 30, 6, seed=1)
    a = np.array(lora_a)
    assert a.shape == (100, 6) and lora_b.shape == (6, 30) and not np.array(lora_b).any()
    assert np.abs(a).max() <= 1 / np.sqrt(100)
    # U(-c, c) has variance c^2 / 3 = 1/300; 600 samples put the sample variance within ~6% (1 sd); allow 25%.
    assert a.var() == pytest.approx(1 / 300, rel=0.25)
    assert np.array_equal(a, np.array(lora_factors(100, 30, 6, seed=1)[0]))


def grid_round_trip(step: float):
    """A stand-in 'quantizer' independent of forge_mlx.quant: round every entry to a multiple of `step`."""
    return lambda w: mx.round(w / step) * step


def strong_directions_matrix(seed: int = 0) -> np.ndarray:
    """A few strong directions over Gaussian noise, like LLM weights with outlier directions."""
    rng = np.random.default_rng(seed)
    noise = rng.standard_normal((96, 128)) * 0.02
    return (spectrum_matrix(96, 128, np.array([4.0, 3.0, 2.5, 2.0]), seed) + noise).astype(np.float32)


def test_qpissa_iterations_against_the_formula():
    w = strong_directions_matrix()
    quant = grid_round_trip(0.05)
    lora_a, lora_b, residual, errors = qpissa(mx.array(w), 8, 2.0, quant, iters=5)
    # Iteration 1 is PiSSA then quantize: its error is ||W - Q(W_res) - W_r|| / ||W|| with W_res = W - W_r.
    a1, b1, res1 = pissa_factors(mx.array(w), 8, 2.0)
    expected = rel(np.array(quant(res1)) + 2.0 * (np.array(a1) @ np.array(b1)).T, w)
    assert errors[0] == pytest.approx(expected, rel=1e-4)  # both fp32 norms of the same arrays; 1e-4 is round-off
    # The returned iterate is the best one, and its error is what the reported minimum says.
    got = rel(np.array(quant(residual)) + 2.0 * (np.array(lora_a) @ np.array(lora_b)).T, w)
    assert got == pytest.approx(min(errors), rel=1e-4)
    # Refitting the factors to the quantization error helps (non-increasing up to 1%) and beats quantizing W.
    assert all(later <= earlier * 1.01 for earlier, later in zip(errors, errors[1:], strict=False))
    assert errors[-1] < errors[0] < rel(np.array(quant(mx.array(w))), w)


def quant_round_trip(kind: str):
    quant = pytest.importorskip("forge_mlx.quant", reason="forge_mlx.quant not written yet")
    return lambda w: quant.quantize_dequantize(w, kind)


@pytest.mark.parametrize("kind", ["affine", "nf4"])
def test_qpissa_beats_direct_quantization(kind):
    w = strong_directions_matrix(seed=1)
    round_trip = quant_round_trip(kind)
    errors = qpissa(mx.array(w), 8, 2.0, round_trip, iters=5)[3]
    direct = rel(np.array(round_trip(mx.array(w))), w)
    assert all(later <= earlier * 1.01 for earlier, later in zip(errors, errors[1:], strict=False))
    assert errors[-1] < direct


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["affine", "nf4"])
def test_qpissa_on_smollm2_q_proj(kind):
    if not SMOLLM2.exists():
        pytest.skip(f"{SMOLLM2} not downloaded")
    round_trip = quant_round_trip(kind)
    weights = mx.load(str(SMOLLM2))
    w = weights["model.layers.0.self_attn.q_proj.weight"].astype(mx.float32)
    errors = qpissa(w, 64, 2.0, round_trip, iters=5)[3]
    direct = rel(np.array(round_trip(w)), np.array(w))
    # PiSSA moves the top-64 directions (most outlier energy) out of the 4-bit store, as the paper reports
    # for LLaMA. Seen: direct ~0.10 (affine and nf4), PiSSA ~0.031, iteration 5 ~0.024. Require a 2x gain.
    assert errors[0] < direct / 2
    assert all(later <= earlier * 1.01 for earlier, later in zip(errors, errors[1:], strict=False))
    assert errors[-1] < errors[0]
