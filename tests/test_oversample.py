"""adapter.oversample: the randomized SVD's extra sketch columns (0 = PEFT's pissa_niter_N), against a numpy
subspace iteration, across the two backends, and through a run's files and its reload."""

import json
import sys
from dataclasses import replace
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from forge_mlx import pissa
from forge_mlx.adapters import adapter_weights
from forge_mlx.config import load_config
from forge_mlx.errors import ForgeError
from forge_mlx.run_files import run_config

sys.path.insert(0, str(Path(__file__).parent))
import helpers  # noqa: E402
from test_pissa import rel, spectrum_matrix  # noqa: E402

RANK, NITER, SEED = 8, 2, 7
# A slowly decaying spectrum (0.97x per direction): few power iterations leave the sketch far from the top-r
# subspace, so 0 and 10 extra columns give clearly different factors (distance between them 0.5-0.7 seen).
SLOW = 0.97 ** np.arange(96)


def numpy_subspace_iteration(w: np.ndarray, omega: np.ndarray, rank: int, niter: int) -> np.ndarray:
    """u_r s_r vt_r by Halko et al. (2009) alg. 4.4 + 5.1 in float64, QR at every step: the product only."""
    q = np.linalg.qr(w @ omega)[0]  # (out, k)
    for _ in range(niter):
        q = np.linalg.qr(w @ np.linalg.qr(w.T @ q)[0])[0]
    u, s, vt = np.linalg.svd(q.T @ w, full_matrices=False)  # (k, k), (k,), (k, in)
    return (q @ u[:, :rank] * s[:rank]) @ vt[:rank]


def product(u, s, vt) -> np.ndarray:
    return (np.asarray(u, np.float64) * np.asarray(s, np.float64)) @ np.asarray(vt, np.float64)


def mlx_sketch(in_dims: int, columns: int, seed: int) -> np.ndarray:
    """The (in, k) Gaussian sketch randomized_svd draws (the draw itself is tested in test_torch_backend)."""
    return np.array(mx.random.normal((in_dims, columns), key=mx.random.key(seed)), np.float64)


@pytest.mark.parametrize("shape", [(96, 128), (128, 96)])
@pytest.mark.parametrize("oversample", [0, 3, 10])
def test_randomized_svd_is_subspace_iteration_with_rank_plus_oversample_columns(shape, oversample):
    w = spectrum_matrix(*shape, SLOW, seed=3).astype(np.float32)
    sketch = mlx_sketch(shape[1], RANK + oversample, SEED)
    expected = numpy_subspace_iteration(w.astype(np.float64), sketch, RANK, NITER)
    got = product(*pissa.principal_svd(mx.array(w), RANK, NITER, SEED, oversample))
    # LU (fp32) vs QR (float64) renormalisation span the same subspace; what differs is fp32 round-off, ~1e-6
    # seen, 1e-5 allowed. A different column count moves the result by ~0.1-0.8 (checked below), 4 decades above.
    assert rel(got, expected) < 1e-5


def test_oversample_zero_is_the_sketch_projection_and_differs_from_ten():
    w = spectrum_matrix(96, 128, SLOW, seed=3).astype(np.float32)
    u, s, vt = (np.array(t, np.float64) for t in pissa.principal_svd(mx.array(w), RANK, NITER, SEED, 0))
    # with k = r columns nothing is truncated: u s vt = u u^T w, the projection of w onto the sketch's span
    assert rel((u * s) @ vt, u @ u.T @ w) < 1e-5  # fp32 round-off as above
    ten = product(*pissa.principal_svd(mx.array(w), RANK, NITER, SEED, 10))
    exact = product(*pissa.principal_svd(mx.array(w), RANK))
    assert rel((u * s) @ vt, ten) > 0.1
    # fewer columns, a worse sketch: 0.52 vs 0.25 from the exact rank-8 part seen
    assert rel(ten, exact) < rel((u * s) @ vt, exact)


@pytest.mark.parametrize("niter", [None, 2])
def test_the_default_is_ten_and_unchanged(niter):
    w = mx.array(spectrum_matrix(96, 128, SLOW, seed=3).astype(np.float32))
    grid = lambda x: mx.round(x / 0.05) * 0.05  # noqa: E731  (a stand-in quantizer)
    default = [*pissa.pissa_factors(w, RANK, 2.0, niter, SEED), *pissa.qpissa(w, RANK, 2.0, grid, 2, niter, SEED)[:3]]
    ten = [
        *pissa.pissa_factors(w, RANK, 2.0, niter, SEED, oversample=10),
        *pissa.qpissa(w, RANK, 2.0, grid, 2, niter, SEED, oversample=10)[:3],
    ]
    assert pissa.OVERSAMPLE == 10 and load_config(None, []).adapter.oversample == 10
    assert all(np.array_equal(np.array(a), np.array(b)) for a, b in zip(default, ten, strict=True))


@pytest.mark.parametrize("shape", [(48, 80), (80, 48)])
def test_torch_backend_agrees_at_oversample_zero(shape):
    torch = pytest.importorskip("torch")
    from forge_mlx.torch_backend import pissa as torch_pissa

    w = spectrum_matrix(*shape, 0.97 ** np.arange(48), seed=2).astype(np.float32)
    a, b, res = (t.numpy() for t in torch_pissa.pissa_factors(torch.from_numpy(w), 6, 2.0, NITER, SEED, 0))
    ma, mb, mres = (np.array(t) for t in pissa.pissa_factors(mx.array(w), 6, 2.0, NITER, SEED, 0))
    # the same MLX-drawn sketch and the same LU basis: products agree to fp32 round-off (as at oversample 10 in
    # test_torch_backend; 1e-4 allowed), and both are numpy's q = r subspace iteration to 1e-5
    assert rel(2.0 * a @ b, 2.0 * ma @ mb) < 1e-4 and rel(res, mres) < 1e-4
    expected = numpy_subspace_iteration(w.astype(np.float64), mlx_sketch(shape[1], 6, SEED), 6, NITER)
    assert rel(2.0 * (a @ b).T, expected) < 1e-5


def test_negative_oversample_is_rejected():
    from mlx import nn

    from forge_mlx.adapters import build_adapter

    with pytest.raises(ForgeError, match="oversample must be at least 0"):
        build_adapter(nn.Linear(16, 8), 4, init="pissa_niter_2", oversample=-1)
    with pytest.raises(ForgeError, match="'adapter.oversample' is -1; expected >= 0"):
        load_config(None, ["adapter.oversample=-1"])


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A one-step MLX run with pissa_niter_2 at oversample 0 over an unquantized residual."""
    from forge_mlx.pipeline import run_training

    root = tmp_path_factory.mktemp("oversample")
    settings = ("adapter.init=pissa_niter_2", "adapter.oversample=0", "adapter.residual=none", "train.steps=1")
    run_training(helpers.tiny_config(root, "run", *settings, "dpo.enabled=false"), log=helpers.quiet)
    return root / "run"


def base_weights(run_dir: Path) -> dict[str, np.ndarray]:
    return helpers.load_arrays(Path(run_config(run_dir).model) / "model.safetensors")


def test_run_records_oversample_and_rebuilds_its_init(run):
    assert json.loads((run / "adapter_config.json").read_text())["oversample"] == 0
    config = run_config(run)
    assert config.adapter.oversample == 0
    saved = helpers.load_arrays(run / "adapters_init.safetensors")
    rebuilt, _ = helpers.adapted_model(config)
    # the same deterministic init from config.yaml on the same CPU: bit-identical
    assert helpers.max_abs_diff({k: np.array(v) for k, v in adapter_weights(rebuilt).items()}, saved) == 0.0
    ten, _ = helpers.adapted_model(replace(config, adapter=replace(config.adapter, oversample=10)))
    # not vacuous: 10 extra columns give other adapters
    assert helpers.max_abs_diff({k: np.array(v) for k, v in adapter_weights(ten).items()}, saved) > 1e-2


def test_mlx_reload_of_the_init_is_the_base_model(run):
    from forge_mlx.runs import load_run

    model, _, _, meta = load_run(run, adapters="init")
    assert meta["oversample"] == 0
    base = base_weights(run)
    for path in meta["targets"]:
        layer = dict(model.named_modules())[path]
        fused = np.array(layer.fuse().weight, np.float64)
        # residual (rebuilt at oversample 0) + the saved init delta = W up to fp32 round-off (~1e-7; 1e-5
        # allowed); a residual rebuilt at oversample 10 would be off by the two inits' difference (> 1e-2)
        assert rel(fused, base[f"{path}.weight"]) < 1e-5, path


def test_torch_reload_of_the_init_is_the_base_model(run):
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from forge_mlx.torch_backend.quant import dequantize_residual
    from forge_mlx.torch_backend.runs import load_run

    model, _, _, meta = load_run(run, adapters="init", device="cpu")
    base = base_weights(run)
    for path in meta["targets"]:
        layer = model.get_submodule(path)
        fused = (dequantize_residual(layer.residual) + layer.delta_weight()).detach().double().numpy()
        # the torch residual from the same sketch (MLX's draws) + the MLX run's saved delta: fp32 round-off
        assert rel(fused, base[f"{path}.weight"]) < 1e-5, path
