"""The training loop on a tiny random llama saved as an HF folder: the loss falls, masked prompt tokens get no
gradient, token-weighted accumulation equals one big batch, and gradient checkpointing leaves gradients
alone."""

import math

import helpers
import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
import pytest
from mlx.utils import tree_flatten
from mlx_lm.models import llama

from forge_mlx.adapters import adapter_weights, load_adapter_weights
from forge_mlx.data.jsonl import load_split
from forge_mlx.data.sft import encode_sft_split
from forge_mlx.losses import sft_loss
from forge_mlx.pipeline import run_training, sft_loss_fn
from forge_mlx.runs import load_run
from forge_mlx.train import checkpoint_blocks, make_step


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    helpers.tiny_config(root)  # writes the model folder and the data once
    return root


@pytest.fixture(scope="module")
def loaded(root):
    config = helpers.tiny_config(root)
    model, tokenizer = helpers.adapted_model(config)
    examples = helpers.sft_examples(config, tokenizer)
    return model, tokenizer, examples


def grads(model, loss, *arrays) -> dict[str, np.ndarray]:
    """Adapter gradients of loss(model, *arrays) -> scalar, flattened to numpy."""
    _, g = nn.value_and_grad(model, loss)(model, *arrays)
    return {k: np.array(v) for k, v in tree_flatten(g)}


def max_rel(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> float:
    """max over tensors of |a - b|_inf / |b|_inf."""
    assert a.keys() == b.keys()
    return max(float(np.abs(a[k] - b[k]).max() / np.abs(b[k]).max()) for k in a)


def test_loss_falls_memorising_eight_sequences(root):
    config = helpers.tiny_config(root, "fall", "train.batch_size=8")  # one batch = all 8 examples, 30 steps
    summary = run_training(config, log=helpers.quiet)
    run = root / "fall"
    loss = helpers.losses(run)
    assert sorted(loss) == list(range(1, 31)) and summary["sft"]["final_loss"] == loss[30]
    # Step 1's loss is the initial model's mean NLL over all supervised tokens, recomputed here in float64
    # from the PiSSA-init model's logits (same NF4 residual); fp32 vs float64 on ~40 tokens: 1e-4.
    model, tokenizer, _, _ = load_run(run, adapters="init")
    tokens, mask = helpers.pad_rows(helpers.sft_examples(config, tokenizer), tokenizer.pad_token_id)
    logits = np.array(model(mx.array(tokens[:, :-1])), np.float64)  # (8, T-1, V)
    logp = logits - logits.max(-1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
    b, t = np.nonzero(mask[:, 1:])
    assert loss[1] == pytest.approx(-logp[b, t, tokens[b, t + 1]].mean(), abs=1e-4)
    # a random init is near uniform over the 64-token vocabulary, so the first loss is close to ln 64 = 4.16
    assert abs(loss[1] - math.log(helpers.VOCAB)) < 0.2
    # memorising: measured 4.13 -> 0.60 over 30 steps at lr 3e-3; a quarter of the start leaves margin
    assert loss[30] < 0.25 * loss[1]
    assert np.mean([loss[s] for s in range(26, 31)]) < np.mean([loss[s] for s in range(1, 6)]) - 2.0
    final = helpers.load_arrays(run / "adapters.safetensors")
    last_ckpt = helpers.load_arrays(run / "checkpoints" / "sft-000030" / "adapters.safetensors")
    assert helpers.max_abs_diff(final, last_ckpt) == 0.0
    assert helpers.max_abs_diff(final, helpers.load_arrays(run / "adapters_init.safetensors")) > 1e-3


class _Body(nn.Module):
    """A body whose hidden state is a parameter that ignores the input: tokens then matter only as targets."""

    def __init__(self, h: mx.array, vocab: int):
        super().__init__()
        self.h = h  # (B, T-1, D)
        self.embed_tokens = nn.Embedding(vocab, h.shape[-1])

    def __call__(self, tokens: mx.array) -> mx.array:
        return self.h


class _Probe(nn.Module):
    def __init__(self, h: mx.array, vocab: int):
        super().__init__()
        self.model = _Body(h, vocab)
        self.lm_head = nn.Linear(h.shape[-1], vocab, bias=False)


def test_masked_positions_get_exactly_zero_gradient_at_the_head_input():
    """dL/dh at each position is the analytic (softmax - onehot) * mask / n @ W: zero where the mask is 0, and
    changing the targets there leaves loss and gradient bit-identical (nothing leaks from masked targets)."""
    rng = np.random.default_rng(0)
    b, t, d, v = 3, 10, 16, 23
    h = mx.array(rng.standard_normal((b, t - 1, d)).astype(np.float32))
    probe = _Probe(h, v)
    probe.freeze()
    probe.model.unfreeze(keys=["h"], recurse=False)
    tokens = rng.integers(0, v, (b, t)).astype(np.int32)
    mask = np.zeros((b, t), bool)
    mask[0, 4:9], mask[1, 2:10], mask[2, 7:8] = True, True, True  # prompt, completion, padding per row

    def loss(model, tok, msk):
        return sft_loss(model, tok, msk)[0]

    value, g = nn.value_and_grad(probe, loss)(probe, mx.array(tokens), mx.array(mask))
    got = np.array(g["model"]["h"])  # (B, T-1, D)
    w = np.array(probe.lm_head.weight, np.float64)  # (V, D)
    logits = np.array(h, np.float64) @ w.T  # (B, T-1, V)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    onehot = np.eye(v)[tokens[:, 1:]]  # (B, T-1, V)
    m = mask[:, 1:, None]
    want = (p - onehot) * m / m.sum() @ w  # (B, T-1, D)
    # fp32 softmax and matmul over V=23, D=16 against float64: ~1e-7 on entries of ~1e-2, so 1e-6 absolute
    np.testing.assert_allclose(got, want, atol=1e-6)
    assert np.all(got[~mask[:, 1:]] == 0.0) and np.abs(got[mask[:, 1:]]).min(axis=-1).max() > 0
    # the masked positions' targets are free to change: loss and gradient are bit-identical
    other = np.where(mask, tokens, (tokens + 1 + rng.integers(0, v - 1, tokens.shape)) % v).astype(np.int32)
    assert (other != tokens).sum() == (~mask).sum()
    value2, g2 = nn.value_and_grad(probe, loss)(probe, mx.array(other), mx.array(mask))
    assert value2.item() == value.item() and np.array_equal(np.array(g2["model"]["h"]), got)
    # control: changing one supervised target does change the gradient
    flipped = tokens.copy()
    flipped[1, 5] = (flipped[1, 5] + 1) % v
    _, g3 = nn.value_and_grad(probe, loss)(probe, mx.array(flipped), mx.array(mask))
    assert np.abs(np.array(g3["model"]["h"]) - got).max() > 1e-3


def test_adapter_gradients_come_from_completion_tokens_only(loaded):
    """On the real encoded chat batch, sft_loss's adapter gradients equal those of a loss that holds only the
    completion positions by construction (gathered by index): the prompt's targets add nothing."""
    model, tokenizer, examples = loaded
    tokens, mask = helpers.pad_rows(examples, tokenizer.pad_token_id)
    real = np.arange(tokens.shape[1])[None] < np.array([len(t) for t, _ in examples])[:, None]
    assert (real & ~mask).sum() > 2 * mask.sum()  # the prompts are most of the tokens
    b, t = np.nonzero(mask[:, 1:])  # supervised (row, position) pairs; target is tokens[b, t + 1]
    rows, cols, targets = mx.array(b), mx.array(t), mx.array(tokens[b, t + 1])

    def gathered(model, tok):
        logp = nn.log_softmax(model(tok[:, :-1]).astype(mx.float32), axis=-1)  # (B, T-1, V)
        return -logp[rows, cols, targets].mean()

    def masked(model, tok, msk):
        return sft_loss(model, tok, msk)[0]

    want = grads(model, gathered, mx.array(tokens))
    got = grads(model, masked, mx.array(tokens), mx.array(mask))
    assert got.keys() == adapter_weights(model).keys()  # only the adapters have gradients
    # same math, different reduction order in fp32: relative 1e-5
    assert max_rel(got, want) < 1e-5
    everything = grads(model, masked, mx.array(tokens), mx.array(real))  # control: prompts supervised too
    assert max_rel(everything, want) > 1e-2


def run_one_step(model, micro_batches, run_dir, lr: float) -> dict[str, np.ndarray]:
    """One SGD step of train_loop over the given micro-batches (grad_accum = their count)."""
    helpers.run_loop(
        model,
        optim.SGD(learning_rate=lr),
        sft_loss_fn(None),
        iter(micro_batches),
        run_dir,
        grad_accum=len(micro_batches),
    )
    return {k: np.array(v) for k, v in adapter_weights(model).items()}


def test_accumulation_equals_one_big_batch_with_unequal_token_counts(loaded, tmp_path):
    """k=2 micro-batches of b=2 give the same SGD update as one batch of 4, although the micro-batches hold
    different numbers of supervised tokens (the loop weights each micro-batch's gradient by its count)."""
    model, tokenizer, examples = loaded
    tokens, mask = helpers.pad_rows(examples, tokenizer.pad_token_id)
    counts = mask[:, 1:].sum(1)
    short, long = np.argsort(counts, kind="stable")[:2], np.argsort(counts, kind="stable")[-2:]
    order = np.concatenate([short, long])
    n1, n2 = counts[short].sum(), counts[long].sum()
    assert n2 >= 2 * n1  # unequal counts, so an unweighted mean of the two micro-gradients would be wrong

    def part(rows):
        return (mx.array(tokens[rows]), mx.array(mask[rows])), int(mask[rows].sum())

    start = adapter_weights(model)
    lr = 0.5
    accumulated = run_one_step(model, [part(short), part(long)], tmp_path / "accum", lr)
    load_adapter_weights(model, start)
    big = run_one_step(model, [part(order)], tmp_path / "big", lr)
    load_adapter_weights(model, start)

    def loss(model, tok, msk):
        return sft_loss(model, tok, msk)[0]

    g_all = grads(model, loss, mx.array(tokens[order]), mx.array(mask[order]))
    g_short = grads(model, loss, mx.array(tokens[short]), mx.array(mask[short]))
    g_long = grads(model, loss, mx.array(tokens[long]), mx.array(mask[long]))
    assert set(start) == set(g_all)
    w0 = {k: np.array(v) for k, v in start.items()}
    expected = {k: w0[k] - lr * g_all[k] for k in w0}  # SGD: W1 = W0 - lr * mean-token gradient
    naive = {k: w0[k] - lr * (g_short[k] + g_long[k]) / 2 for k in w0}
    # an update of ~lr * |g| ~ 1e-2 in fp32 with sums in a different order: 1e-6 absolute
    assert helpers.max_abs_diff(accumulated, big) < 1e-6
    assert helpers.max_abs_diff(accumulated, expected) < 1e-6
    assert helpers.max_abs_diff(accumulated, naive) > 1e-4  # the test can tell token weighting from a mean


def test_gradient_checkpointing_gives_the_same_gradients(root):
    config = helpers.tiny_config(root)
    model, tokenizer = helpers.adapted_model(config)
    tokens, mask = helpers.pad_rows(helpers.sft_examples(config, tokenizer), tokenizer.pad_token_id)
    batch = (mx.array(tokens), mx.array(mask))

    def loss(model, tok, msk):
        return sft_loss(model, tok, msk)[0]

    def compiled_grads() -> dict[str, np.ndarray]:
        micro, _, _ = make_step(model, optim.SGD(learning_rate=0.0), sft_loss_fn(None), 1.0)
        _, weight, _, g = micro(None, *batch)
        return {k: np.array(v / weight) for k, v in tree_flatten(g)}

    names = [k for k, _ in tree_flatten(model.parameters())]
    plain, plain_compiled = grads(model, loss, *batch), compiled_grads()
    checkpoint_blocks(model)
    classes = [type(block) for block in model.layers]
    checkpoint_blocks(model)  # a second call wraps nothing twice
    assert [type(block) for block in model.layers] == classes
    assert all(c is not llama.TransformerBlock and issubclass(c, llama.TransformerBlock) for c in classes)
    assert type(helpers.tiny_llama().layers[0]) is llama.TransformerBlock  # other models are untouched
    assert [k for k, _ in tree_flatten(model.parameters())] == names
    # recomputation replays the same ops on the same inputs: measured bit-identical; 1e-6 relative
    assert max_rel(grads(model, loss, *batch), plain) < 1e-6
    assert max_rel(compiled_grads(), plain_compiled) < 1e-6
    assert max_rel(plain_compiled, plain) < 1e-5


def test_checkpointed_training_run_matches_the_plain_one(root):
    """End to end (compiled step, NF4 residual, AdamW): grad_checkpoint=true changes no loss or weight."""
    for name, flag in (("plain", "false"), ("ckpt", "true")):
        run_training(
            helpers.tiny_config(root, name, "train.steps=5", f"train.grad_checkpoint={flag}"),
            log=helpers.quiet,
        )
    plain, ckpt = helpers.losses(root / "plain"), helpers.losses(root / "ckpt")
    assert sorted(plain) == [1, 2, 3, 4, 5]
    assert max(abs(plain[s] - ckpt[s]) for s in plain) <= 1e-6  # same ops replayed: measured bit-identical
    final = [helpers.load_arrays(root / name / "adapters.safetensors") for name in ("plain", "ckpt")]
    assert helpers.max_abs_diff(*final) <= 1e-6


def test_validation_loss_is_the_eval_mode_loss(root):
    """With dropout 0.5 the reported validation loss is the model's loss with dropout off (recomputed here in
    float64 from the run's final adapters over valid.jsonl): fp32 over ~20 tokens, 1e-5."""
    config = helpers.tiny_config(
        root, "val", "train.steps=2", "train.val_batches=2", "train.steps_per_eval=1", "adapter.dropout=0.5"
    )
    run_training(config, log=helpers.quiet)
    val = helpers.losses(root / "val", key="val_loss")
    assert sorted(val) == [1, 2]
    model, tokenizer, _, _ = load_run(root / "val")
    valid = encode_sft_split(load_split(config.data.train, "valid", kind="sft"), tokenizer, max_seq_length=64)
    tokens, mask = helpers.pad_rows(valid.examples, tokenizer.pad_token_id)
    logits = np.array(model(mx.array(tokens[:, :-1])), np.float64)  # (4, T-1, V)
    logp = logits - logits.max(-1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
    b, t = np.nonzero(mask[:, 1:])
    assert val[2] == pytest.approx(-logp[b, t, tokens[b, t + 1]].mean(), abs=1e-5)
