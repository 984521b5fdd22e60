"""MLX's random draws in numpy (threefry2x32 bits, uniform, normal), so the torch backend starts from the same
LoRA init and the same randomized-SVD sketch as the MLX side: a run's init adapters, and the residual that
runs.load_run rebuilds with MLX, do not depend on the backend that trained it.

Ported from mlx/random.cpp, mlx/backend/cpu/threefry.cpp and the erfinv of mlx/backend/cpu/simd/math.h; the
bits are exact, uniform values exact, normal values within an ulp or two (erfinv's log and fma roundings).
"""

from __future__ import annotations

import math

import numpy as np

_ROTATIONS = ((13, 15, 26, 6), (17, 29, 16, 24))
_UINT32_MAX = np.float32(4294967295.0)  # rounds to 2**32, as MLX's float32 maxval does
_BELOW_ONE = np.nextafter(np.float32(1), np.float32(0))
# erfinv polynomial coefficients (Giles 2010, as refit by MLX), highest degree first
_ERFINV_TAIL = (
    3.03697567e-10,
    2.93243101e-8,
    1.22150334e-6,
    2.84108955e-5,
    3.93552968e-4,
    3.02698812e-3,
    4.83185798e-3,
    -2.64646143e-1,
    8.40016484e-1,
)
_ERFINV_CENTRE = (
    5.43877832e-9,
    1.43285448e-7,
    1.22774793e-6,
    1.12963626e-7,
    -5.61530760e-5,
    -1.47697632e-4,
    2.31468678e-3,
    1.15392581e-2,
    -2.32015476e-1,
    8.86226892e-1,
)


def key(seed: int) -> np.ndarray:
    """mx.random.key(seed): (2,) uint32, the high and low words of the 64-bit seed."""
    return np.array([(seed >> 32) & 0xFFFFFFFF, seed & 0xFFFFFFFF], np.uint32)


def _threefry(k: np.ndarray, x0: np.ndarray, x1: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Threefry-2x32 with 20 rounds (Salmon et al. 2011) on counter pairs; uint32 arithmetic wraps."""
    ks = (k[0], k[1], k[0] ^ k[1] ^ np.uint32(0x1BD11BDA))
    x0, x1 = x0 + ks[0], x1 + ks[1]
    for i in range(5):
        for r in _ROTATIONS[i % 2]:
            x0 = x0 + x1
            x1 = (x1 << np.uint32(r)) | (x1 >> np.uint32(32 - r))
            x1 = x1 ^ x0
        x0 = x0 + ks[(i + 1) % 3]
        x1 = x1 + ks[(i + 2) % 3] + np.uint32(i + 1)
    return x0, x1


def bits(shape: tuple[int, ...], k: np.ndarray) -> np.ndarray:
    """mx.random.bits(shape, key=k): the first half of the words from counters (i, i + half), the second half
    from their second outputs; an odd count's middle word from counter (half, 0)."""
    n = math.prod(shape)
    half, odd = n // 2, n % 2
    out = np.empty(n, np.uint32)
    counter = np.arange(half, dtype=np.uint32)
    out[:half], out[half + odd :] = _threefry(k, counter, counter + np.uint32(half + odd))
    if odd:
        out[half] = _threefry(k, np.array([half], np.uint32), np.zeros(1, np.uint32))[0][0]
    return out.reshape(shape)


def uniform(low: float, high: float, shape: tuple[int, ...], k: np.ndarray) -> np.ndarray:
    """mx.random.uniform(low, high, shape, key=k) in float32: bits / 2**32, capped below 1, then scaled."""
    lo, hi = np.float32(low), np.float32(high)
    unit = np.minimum(bits(shape, k).astype(np.float32) / _UINT32_MAX, _BELOW_ONE)
    return (hi - lo) * unit + lo


def _fma(a: np.ndarray, b: np.ndarray, c: float) -> np.ndarray:
    """float32 a * b + c with one rounding (the float64 product of two float32 values is exact)."""
    return (a.astype(np.float64) * b.astype(np.float64) + np.float64(np.float32(c))).astype(np.float32)


def _polynomial(coefficients: tuple[float, ...], t: np.ndarray) -> np.ndarray:
    p = np.full_like(t, np.float32(coefficients[0]))
    for c in coefficients[1:]:
        p = _fma(p, t, c)
    return p


def erfinv(a: np.ndarray) -> np.ndarray:
    """MLX's float32 erfinv: t = log(1 - a^2), one of two polynomials in t, times a."""
    t = np.log(_fma(a, -a, 1.0))
    return a * np.where(np.abs(t) > np.float32(6.125), _polynomial(_ERFINV_TAIL, t), _polynomial(_ERFINV_CENTRE, t))


def normal(shape: tuple[int, ...], k: np.ndarray) -> np.ndarray:
    """mx.random.normal(shape, key=k): sqrt(2) * erfinv(uniform(nextafter(-1, 0), 1)), float32."""
    low = float(np.nextafter(np.float32(-1), np.float32(0)))
    return np.float32(math.sqrt(2.0)) * erfinv(uniform(low, 1.0, shape, k))
