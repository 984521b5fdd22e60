"""The torch backend against the MLX one: init draws, PiSSA factors, NF4 bytes, affine values, DPO losses,
AdamW; then both pipelines on the same tiny random llama (tests/helpers.py): training curves, run-directory
files, resume, export, and adapters that load across backends with the same logits."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("mlx.core")  # the reference side of every comparison

import mlx.core as mx  # noqa: E402
import mlx.optimizers as optim  # noqa: E402
from mlx.utils import tree_flatten  # noqa: E402

from forge_mlx import losses as mlx_losses  # noqa: E402
from forge_mlx import pissa as mlx_pissa  # noqa: E402
from forge_mlx.config import save_config  # noqa: E402
from forge_mlx.errors import ForgeError  # noqa: E402
from forge_mlx.quant import nf4 as mlx_nf4  # noqa: E402
from forge_mlx.schedule import mlx_schedule  # noqa: E402
from forge_mlx.torch_backend import affine, mlx_random, nf4, pissa  # noqa: E402
from forge_mlx.torch_backend.device import DEVICE_ENV, compute_dtype, pick_device  # noqa: E402
from forge_mlx.torch_backend.losses import dpo_loss  # noqa: E402
from forge_mlx.torch_backend.train import AdamW, clip_grad_norm, schedule  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from helpers import MODEL_ARGS, load_arrays, losses, tiny_config  # noqa: E402

EPS32 = float(np.finfo(np.float32).eps)


def rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(np.asarray(a, np.float64) - b) / np.linalg.norm(b))


# ---- pure pieces against MLX ---------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 7, 2**33 + 5])
@pytest.mark.parametrize("shape", [(1,), (5,), (64, 26), (3, 5, 7)])
def test_mlx_random_draws_match_mlx(seed, shape):
    key = mlx_random.key(seed)
    assert np.array_equal(key, np.array(mx.random.key(seed)))
    # uniform is bits -> float32 ops with one rounding each, in the same order: bit-identical
    expected = np.array(mx.random.uniform(-0.3, 0.3, shape, key=mx.random.key(seed)))
    assert np.array_equal(mlx_random.uniform(-0.3, 0.3, shape, key), expected)
    # normal goes through erfinv: its log and fma roundings may differ by an ulp or two (|x| < 6: 2 ulp
    # < 1e-6)
    expected = np.array(mx.random.normal(shape, key=mx.random.key(seed)))
    np.testing.assert_allclose(mlx_random.normal(shape, key), expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    "shape, blocksize, double_quant",
    [
        ((48, 80), 64, True),
        ((7, 13), 32, True),
        ((33, 300), 64, False),
        ((3, 701), 64, True),
        ((130, 130), 64, True),
    ],
)
def test_nf4_bytes_identical_to_the_mlx_side(shape, blocksize, double_quant):
    # odd element counts, partial last blocks, and > 256 blocks (a partial nested block) are all covered
    w = (np.random.default_rng(0).standard_normal(shape) * 0.05).astype(np.float32)
    ours = nf4.quantize_nf4(torch.from_numpy(w), blocksize, double_quant)
    theirs = mlx_nf4.quantize_nf4(mx.array(w), blocksize, double_quant)
    keys = ["packed", "absmax"] + (["nested_absmax", "nested_quant_map", "offset"] if double_quant else [])
    for key in keys:
        assert np.array_equal(getattr(ours, key).numpy(), np.array(getattr(theirs, key))), key
    # dequantizing is one float32 multiply (and add) per value in either: bit-identical
    assert np.array_equal(nf4.dequantize_nf4(ours).numpy(), np.array(mlx_nf4.dequantize_nf4(theirs)))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_affine_matches_mx_quantize(dtype, bits, group_size):
    w = (np.random.default_rng(1).standard_normal((24, 256)) * 0.1).astype(np.float32)
    w[0, :group_size], w[1, :group_size] = (
        0.0,
        0.5,
    )  # constant groups: the zero-scale and zero-code edge cases
    mw = mx.array(w).astype(getattr(mx, dtype))
    words, scales, biases = mx.quantize(mw, group_size, bits, mode="affine")
    ours = affine.quantize_affine(torch.from_numpy(w).to(getattr(torch, dtype)), group_size, bits)
    assert np.array_equal(ours[0].numpy().view(np.uint32), np.array(words))
    for mine, theirs in zip(ours[1:], (scales, biases), strict=True):
        assert np.array_equal(mine.float().numpy(), np.array(theirs.astype(mx.float32)))
    expected = np.array(mx.dequantize(words, scales, biases, group_size, bits, mode="affine").astype(mx.float32))
    # scale * q + bias in the scales' dtype, rounded per op; fp32 allows for a fused multiply-add (|w| < 1)
    got = affine.dequantize_affine(*ours, group_size, bits).float().numpy()
    np.testing.assert_allclose(got, expected, rtol=0, atol=EPS32 if dtype == "float32" else 0)


@pytest.mark.parametrize("shape", [(48, 80), (80, 48)])
@pytest.mark.parametrize("niter", [None, 2])
def test_pissa_factors_match_mlx_up_to_sign(shape, niter):
    rng = np.random.default_rng(2)
    w = (rng.standard_normal(shape) * (0.9 ** np.arange(shape[1]))).astype(np.float32)  # a decaying spectrum
    rank, scale = 6, 2.0
    a, b, res = (t.numpy() for t in pissa.pissa_factors(torch.from_numpy(w), rank, scale, niter, seed=3))
    ma, mb, mres = (np.array(t) for t in mlx_pissa.pissa_factors(mx.array(w), rank, scale, niter, seed=3))
    # singular vectors are unique up to sign, so compare sign-free quantities: the product scale * a @ b and
    # a^T a = diag(S_r / scale). Float32 LAPACK on both sides: ~eps * ||W|| / spectral gap; 1e-4 leaves margin
    # for the randomized sketch, whose draws agree to an ulp (test above).
    assert rel(scale * a @ b, scale * ma @ mb) < 1e-4
    assert rel(res, mres) < 1e-4
    np.testing.assert_allclose(a.T @ a, ma.T @ ma, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(b @ b.T, mb @ mb.T, rtol=1e-4, atol=1e-4)


def test_lora_init_draws_what_mlx_draws():
    a, b = pissa.lora_factors(64, 32, 4, seed=5)
    ma, mb = mlx_pissa.lora_factors(64, 32, 4, seed=5)
    assert np.array_equal(a.numpy(), np.array(ma)) and np.array_equal(b.numpy(), np.array(mb))


@pytest.mark.parametrize(
    "loss_type, ls", [("sigmoid", 0.0), ("sigmoid", 0.2), ("ipo", 0.0), ("hinge", 0.0), ("robust", 0.1)]
)
def test_dpo_loss_matches_mlx(loss_type, ls):
    logps = np.random.default_rng(3).normal(-20, 5, (4, 16)).astype(np.float32)
    ours, our_metrics = dpo_loss(*map(torch.from_numpy, logps), beta=0.3, loss_type=loss_type, label_smoothing=ls)
    theirs, their_metrics = mlx_losses.dpo_loss(
        *map(mx.array, logps), beta=0.3, loss_type=loss_type, label_smoothing=ls
    )
    # the same float32 formula on 16 values: a few ulps of the result
    np.testing.assert_allclose(ours.item(), theirs.item(), rtol=1e-6, atol=1e-6)
    assert our_metrics.keys() == their_metrics.keys()
    for key in our_metrics:
        np.testing.assert_allclose(our_metrics[key].item(), their_metrics[key].item(), rtol=1e-6, atol=1e-6)


def test_adamw_clipping_and_schedule_match_mlx():
    rng = np.random.default_rng(4)
    start = {
        "a": rng.standard_normal((5, 3)).astype(np.float32),
        "b": rng.standard_normal((3, 4)).astype(np.float32),
    }
    grads = [{k: rng.standard_normal(v.shape).astype(np.float32) * 3 for k, v in start.items()} for _ in range(4)]
    ours = AdamW(
        {k: torch.nn.Parameter(torch.from_numpy(v.copy())) for k, v in start.items()},
        schedule(1e-2, 4, 2, 0.1),
        weight_decay=0.05,
    )
    theirs = optim.AdamW(
        learning_rate=mlx_schedule(peak_lr=1e-2, total_steps=4, warmup_steps=2, min_lr_ratio=0.1),
        weight_decay=0.05,
    )
    params = {k: mx.array(v) for k, v in start.items()}
    for g in grads:  # norms ~ 3 * sqrt(27) > 1: every step clips
        clipped, norm = clip_grad_norm({k: torch.from_numpy(v) for k, v in g.items()}, 1.0)
        ours.update(clipped)
        their_clipped, their_norm = optim.clip_grad_norm({k: mx.array(v) for k, v in g.items()}, 1.0)
        params = theirs.apply_gradients(their_clipped, params)
        np.testing.assert_allclose(norm, their_norm.item(), rtol=1e-6)
    # four float32 updates of size <= lr: differences stay at float32 round-off of the parameters (~1e-7)
    for key in start:
        np.testing.assert_allclose(ours.params[key].detach().numpy(), np.array(params[key]), rtol=0, atol=1e-6)
    state = ours.state_arrays()
    their_state = dict(tree_flatten(theirs.state))
    assert state.keys() == their_state.keys()
    for key, value in their_state.items():
        assert state[key].dtype == np.array(value).dtype and state[key].shape == tuple(value.shape)
        np.testing.assert_allclose(state[key], np.array(value), rtol=1e-5, atol=1e-7)


def test_a_nonfinite_gradient_is_seen_and_skipping_leaves_weights_and_state_alone():
    """The torch loop's check before AdamW: any NaN/inf entry in any accumulated gradient vetoes the update."""
    import torch

    from forge_mlx.torch_backend.train import AdamW, grads_finite, zero_grads

    params = {"a": torch.nn.Parameter(torch.ones(3)), "b": torch.nn.Parameter(torch.ones(2))}
    optimizer = AdamW(params, lr=lambda step: 1e-2)
    assert grads_finite(optimizer)  # no gradient yet: nothing to veto
    params["a"].grad, params["b"].grad = torch.ones(3), torch.tensor([1.0, float("nan")])
    assert not grads_finite(optimizer)
    params["b"].grad = torch.tensor([float("inf"), 0.0])
    assert not grads_finite(optimizer)
    zero_grads(optimizer)  # what the loop does on a skip: no step taken, the next step starts clean
    assert grads_finite(optimizer) and optimizer.step == 0
    assert all(torch.equal(p, torch.ones_like(p)) for p in params.values())


def test_device_selection(monkeypatch):
    monkeypatch.setenv(DEVICE_ENV, "cpu")
    assert pick_device() == torch.device("cpu")
    assert pick_device("cpu").type == "cpu"
    monkeypatch.setenv(DEVICE_ENV, "warp-drive")
    with pytest.raises(ForgeError, match="not usable"):
        pick_device()
    assert compute_dtype("auto", torch.device("cpu")) == torch.float32
    assert compute_dtype("bfloat16", torch.device("cpu")) == torch.bfloat16


def test_grad_checkpointing_recomputes_each_layer():
    from transformers import LlamaConfig, LlamaForCausalLM

    from forge_mlx.torch_backend.pipeline import checkpoint_blocks

    model = LlamaForCausalLM(LlamaConfig(**{k: v for k, v in MODEL_ARGS.items() if k != "model_type"}))
    calls = []
    model.model.layers[0].self_attn.q_proj.register_forward_hook(lambda *a: calls.append(1))
    checkpoint_blocks(model)
    model.train()
    model(torch.tensor([[1, 2, 3, 4]])).logits.sum().backward()
    assert len(calls) == 2  # the forward, then the block's recompute in the backward


# ---- both pipelines on the tiny model ------------------------------------------------------------------

RUN_SETTINGS = (
    "train.steps=3",
    "train.save_every=1",
    "train.val_batches=2",
    "train.steps_per_eval=3",
    "train.grad_checkpoint=true",
    "train.loss_chunk_size=8",
    "dpo.enabled=true",
    "dpo.steps=2",
)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The same config trained by each backend: {"root", "mlx", "torch"} folders."""
    from forge_mlx.pipeline import run_training as mlx_run
    from forge_mlx.torch_backend.pipeline import run_training as torch_run

    root = tmp_path_factory.mktemp("backends")
    quiet = lambda *a: None  # noqa: E731
    mlx_run(tiny_config(root, "mlx", *RUN_SETTINGS), log=quiet)
    summary = torch_run(tiny_config(root, "torch", *RUN_SETTINGS), log=quiet)
    assert summary["device"] == "cpu"
    return {"root": root, "mlx": root / "mlx", "torch": root / "torch"}


def test_training_curves_match(runs):
    for phase in ("sft", "dpo"):
        ours, theirs = losses(runs["torch"], phase), losses(runs["mlx"], phase)
        assert ours.keys() == theirs.keys() == set(range(1, 4 if phase == "sft" else 3))
        # step 1 reports the loss of the initial model: the same fp32 forward in another op order (~1e-6 seen)
        assert abs(ours[1] - theirs[1]) < 1e-4
        # later steps went through Adam, which divides by sqrt(v): round-off in a near-zero gradient component
        # can grow to a sizeable update; 1e-3 relative still catches any real difference (1e-6 seen)
        for step in ours:
            assert abs(ours[step] - theirs[step]) <= 1e-3 * abs(theirs[step])
    val = losses(runs["torch"], "sft", "val_loss"), losses(runs["mlx"], "sft", "val_loss")
    assert val[0].keys() == val[1].keys() == {3} and abs(val[0][3] - val[1][3]) <= 1e-3 * val[1][3]
    records = [
        [json.loads(line) for line in (runs[b] / "metrics.jsonl").read_text().splitlines()] for b in ("torch", "mlx")
    ]
    assert [r.keys() for r in records[0]] == [r.keys() for r in records[1]]
    assert [r.get("lr") for r in records[0]] == [r.get("lr") for r in records[1]]  # float32 schedule, same values


def safetensors_layout(path: Path) -> dict[str, tuple]:
    return {k: (v.shape, v.dtype) for k, v in load_arrays(path).items() if not k.startswith("__")}


def test_run_directories_have_the_same_files_and_formats(runs):
    files = [sorted(p.relative_to(runs[b]).as_posix() for p in runs[b].rglob("*")) for b in ("torch", "mlx")]
    assert files[0] == files[1]
    meta = [json.loads((runs[b] / "adapter_config.json").read_text()) for b in ("torch", "mlx")]
    assert meta[0] == meta[1]
    for name in [
        "adapters_init.safetensors",
        "adapters.safetensors",
        "dpo_reference.safetensors",
        *[f for f in files[0] if f.endswith(".safetensors") and f.startswith("checkpoints/")],
    ]:
        assert safetensors_layout(runs["torch"] / name) == safetensors_layout(runs["mlx"] / name), name
    for name in [f for f in files[0] if f.endswith("state.json")]:
        states = [json.loads((runs[b] / name).read_text()) for b in ("torch", "mlx")]
        assert states[0].keys() == states[1].keys() and states[0]["data"] == states[1]["data"]
    # the DPO reference log-probs are the starting policy's: same model up to fp32 forward round-off
    refs = [load_arrays(runs[b] / "dpo_reference.safetensors") for b in ("torch", "mlx")]
    for key in refs[1]:
        np.testing.assert_allclose(refs[0][key], refs[1][key], rtol=1e-5)


def test_init_adapters_agree_up_to_sign(runs):
    ours, theirs = (load_arrays(runs[b] / "adapters_init.safetensors") for b in ("torch", "mlx"))
    for key in [k for k in ours if k.endswith(".lora_a")]:
        b_key = key[: -len("lora_a")] + "lora_b"
        # products are sign-free. A random layer's singular values crowd (s_1 / (s_4 - s_5) ~ 50 here), so
        # fp32 SVDs move the rank-4 subspace by ~eps * 50 ~ 6e-6 (1.3e-5 seen); 1e-4 allowed
        assert rel(ours[key] @ ours[b_key], theirs[key] @ theirs[b_key]) < 1e-4, key


def test_adapters_load_across_backends_with_the_same_logits(runs):
    from forge_mlx.runs import load_run as mlx_load_run
    from forge_mlx.torch_backend.runs import load_run as torch_load_run

    tokens = np.array([[3, 17, 4, 9, 5, 12, 1, 2, 30, 7]])
    for run in ("torch", "mlx"):
        mlx_model = mlx_load_run(runs[run])[0]
        torch_model = torch_load_run(runs[run])[0]
        expected = np.array(mlx_model(mx.array(tokens)))
        with torch.no_grad():
            got = torch_model(torch.from_numpy(tokens).long()).logits.numpy()
        # both rebuild the residual from the run's files and load the same adapters: fp32 forwards of a
        # 2-layer model in different op orders agree to ~1e-6 (seen 2e-6 on logits of size ~2)
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-4)


def test_export_reads_a_torch_run(runs):
    from forge_mlx.export import export_run

    out = runs["root"] / "peft"
    result = export_run(runs["torch"], "peft", out, log=lambda *a: None)
    assert (out / "adapter_model.safetensors").exists() and (out / "adapter_config.json").exists()
    targets = json.loads((runs["torch"] / "adapter_config.json").read_text())["targets"]
    assert result["conversion_error"]["adapted_layers"]["layers"] == len(targets)


def test_torch_resume_continues_exactly(runs):
    from forge_mlx.torch_backend.pipeline import run_training

    resumed = runs["root"] / "resumed"
    shutil.copytree(runs["torch"], resumed)
    for name in [
        "sft_done.json",
        "dpo_done.json",
        "adapters.safetensors",
        "summary.json",
        "dpo_reference.safetensors",
        "checkpoints/sft-000003",
        "checkpoints/dpo-000001",
        "checkpoints/dpo-000002",
    ]:
        path = resumed / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    run_training(
        tiny_config(runs["root"], "resumed", *RUN_SETTINGS, "dpo.enabled=false"),
        resume=True,
        log=lambda *a: None,
    )
    # the records after the checkpoint were dropped and written again: each SFT step once, no stale DPO ones
    from forge_mlx.metrics_log import read_metrics

    steps = lambda run: [(r["phase"], r["step"], "val_loss" in r) for r in read_metrics(run / "metrics.jsonl")]  # noqa: E731
    assert steps(resumed) == [s for s in steps(runs["torch"]) if s[0] == "sft"]
    # same restored adapters, Adam moments, RNG and data position, same CPU ops: bit-identical
    expected = load_arrays(runs["torch"] / "checkpoints/sft-000003/adapters.safetensors")
    got = load_arrays(resumed / "adapters.safetensors")
    assert all(np.array_equal(got[k], expected[k]) for k in expected)


def test_affine_residual_with_randomized_init_trains_alike(runs):
    from forge_mlx.pipeline import run_training as mlx_run
    from forge_mlx.torch_backend.pipeline import run_training as torch_run

    settings = (
        "train.steps=2",
        "adapter.residual=affine",
        "adapter.init=pissa_niter_2",
        "adapter.group_size=32",
    )
    mlx_run(tiny_config(runs["root"], "affine_mlx", *settings), log=lambda *a: None)
    torch_run(tiny_config(runs["root"], "affine_torch", *settings), log=lambda *a: None)
    ours, theirs = losses(runs["root"] / "affine_torch"), losses(runs["root"] / "affine_mlx")
    # the sketch is drawn with MLX's RNG (to an ulp) and the affine bytes are MLX's: the same initial model up
    # to SVD round-off; a different sketch would move the residual and the loss by far more than 1e-4
    assert abs(ours[1] - theirs[1]) < 1e-4 and abs(ours[2] - theirs[2]) <= 1e-3 * theirs[2]


def test_trains_without_mlx_and_times_steps(runs):
    """A fresh interpreter where `import mlx` fails times 2 SFT steps; its losses are the MLX run's."""
    path = runs["root"] / "bench.yaml"
    save_config(tiny_config(runs["root"], "unused", *RUN_SETTINGS), path)
    script = (
        "import json, sys\n"
        "sys.modules['mlx'] = None\n"
        "from forge_mlx.config import load_config\n"
        "from forge_mlx.torch_backend.bench import time_training_steps\n"
        f"result = time_training_steps(load_config({str(path)!r}), steps=2, warmup=0, log=lambda *a: None)\n"
        "assert not [m for m in sys.modules if m.startswith('mlx') and sys.modules[m] is not None]\n"
        "print(json.dumps(result))\n"
    )
    env = {**os.environ, DEVICE_ENV: "cpu"}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["steps"] == 2 and result["tokens"] > 0 and result["tokens_per_s"] > 0
    theirs = losses(runs["mlx"], "sft")
    assert abs(result["losses"][0] - theirs[1]) < 1e-4 and abs(result["losses"][1] - theirs[2]) < 1e-3 * theirs[2]
