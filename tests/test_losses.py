"""Losses against independent numpy computations on a tiny random llama and on random log-probs."""

import math

import helpers
import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten
from mlx_lm.models import llama

from forge_mlx.errors import ForgeError
from forge_mlx.losses import dpo_loss, hidden_and_head, sequence_logps, sft_loss, token_logps

VOCAB, B, T = 97, 3, 12


def tiny_llama(tied: bool) -> llama.Model:
    return helpers.tiny_llama(0, hidden_size=32, intermediate_size=64, vocab_size=VOCAB, tie_word_embeddings=tied)


def batch(seed: int = 0) -> tuple[mx.array, mx.array]:
    """Tokens (B, T) and a completion mask: prompt (0), completion (1), end padding (0); rows differ."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, VOCAB, size=(B, T))
    mask = np.zeros((B, T), dtype=np.int32)
    for row, (start, end) in enumerate([(3, 12), (5, 9), (1, 7)]):
        mask[row, start:end] = 1
    return mx.array(tokens), mx.array(mask)


def numpy_token_logps(model: llama.Model, tokens: mx.array) -> np.ndarray:
    """(B, T-1) target log-probs from the model's own full logits, log-softmax in float64."""
    logits = np.array(model(tokens[:, :-1]).astype(mx.float32), dtype=np.float64)  # (B, T-1, V)
    shifted = logits - logits.max(-1, keepdims=True)
    logp = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    return np.take_along_axis(logp, np.array(tokens)[:, 1:, None], axis=-1)[..., 0]


# fp32 log-softmax vs float64 over V=97 logits of size O(1): error ~ 1e-6, so 1e-5 absolute.
ATOL = 1e-5


@pytest.mark.parametrize("tied", [True, False])
def test_hidden_and_head_picks_the_models_head(tied):
    model = tiny_llama(tied)
    body, owner, head = hidden_and_head(model)
    assert body is model.model
    assert owner is (model.model.embed_tokens if tied else model.lm_head)
    tokens, _ = batch()
    np.testing.assert_allclose(np.array(head(body(tokens))), np.array(model(tokens)), atol=1e-6)


def test_hidden_and_head_rejects_unknown_layouts():
    with pytest.raises(ForgeError, match="embed_tokens"):
        hidden_and_head(nn.Linear(2, 2))


@pytest.mark.parametrize("tied", [True, False])
def test_token_logps_matches_numpy(tied):
    model = tiny_llama(tied)
    tokens, _ = batch()
    got = token_logps(model, tokens)
    assert got.shape == (B, T - 1) and got.dtype == mx.float32
    np.testing.assert_allclose(np.array(got), numpy_token_logps(model, tokens), atol=ATOL)


@pytest.mark.parametrize("tied", [True, False])
def test_sft_loss_matches_numpy(tied):
    model = tiny_llama(tied)
    tokens, mask = batch()
    loss, n_tokens = sft_loss(model, tokens, mask)
    m = np.array(mask)[:, 1:]  # targets are tokens[:, 1:], so their mask is mask[:, 1:]
    ref = -(numpy_token_logps(model, tokens) * m).sum() / m.sum()
    assert n_tokens.item() == m.sum()
    assert loss.item() == pytest.approx(ref, abs=ATOL)


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("average", [False, True])
def test_sequence_logps_matches_numpy(tied, average):
    model = tiny_llama(tied)
    tokens, mask = batch()
    got = sequence_logps(model, tokens, mask, average=average)
    m = np.array(mask)[:, 1:]
    ref = (numpy_token_logps(model, tokens) * m).sum(1)
    if average:
        ref /= m.sum(1)
    assert got.shape == (B,)
    # Sums of up to 9 log-probs: 9 * 1e-5 absolute.
    np.testing.assert_allclose(np.array(got), ref, atol=9 * ATOL)


def test_mask_aligns_to_targets_and_masked_targets_get_zero_weight():
    model = tiny_llama(True)
    tokens, mask = batch()
    base_seq, base_sft = sequence_logps(model, tokens, mask), sft_loss(model, tokens, mask)[0]
    # mask[:, 0] has no target (nothing predicts token 0): switching it on changes nothing.
    first_on = mx.concatenate([mx.ones((B, 1), mx.int32), mask[:, 1:]], axis=1)
    np.testing.assert_array_equal(np.array(sequence_logps(model, tokens, first_on)), np.array(base_seq))
    # End padding (mask 0, after the completion) is context for nothing under causal attention; changing
    # those tokens leaves the result bit-identical only if their own log-probs carry zero weight.
    repadded = np.array(tokens)
    repadded[1, 9:] = (repadded[1, 9:] + 1) % VOCAB
    repadded[2, 7:] = 0
    repadded = mx.array(repadded)
    assert not np.allclose(np.array(token_logps(model, repadded)), np.array(token_logps(model, tokens)))
    np.testing.assert_array_equal(np.array(sequence_logps(model, repadded, mask)), np.array(base_seq))
    assert sft_loss(model, repadded, mask)[0].item() == base_sft.item()


def test_empty_mask_gives_zero_not_nan():
    model = tiny_llama(True)
    tokens, _ = batch()
    loss, n = sft_loss(model, tokens, mx.zeros((B, T), mx.int32))
    assert loss.item() == 0.0 and n.item() == 0


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("chunk_size", [1, 4, 5, 11, 64])
def test_chunked_equals_unchunked_values_and_gradients(tied, chunk_size):
    model = tiny_llama(tied)
    tokens, mask = batch()

    def grads(chunk):
        loss_and_grad = nn.value_and_grad(model, lambda m: sft_loss(m, tokens, mask, chunk_size=chunk)[0])
        loss, g = loss_and_grad(model)
        mx.eval(loss, g)
        return loss, dict(tree_flatten(g))

    ref_logps = token_logps(model, tokens)
    np.testing.assert_allclose(
        np.array(token_logps(model, tokens, chunk_size=chunk_size)), np.array(ref_logps), atol=1e-6
    )
    ref_loss, ref_g = grads(None)
    loss, g = grads(chunk_size)
    assert g.keys() == ref_g.keys() and len(g) == len(tree_flatten(model.trainable_parameters()))
    # Same fp32 ops, only the grouping of sums (per chunk, then across chunks) differs: a few ulps, so 1e-6
    # absolute on the loss and rtol 1e-5 / atol 1e-7 on gradients (entries are O(1e-3 .. 1e-1)).
    assert loss.item() == pytest.approx(ref_loss.item(), abs=1e-6)
    for name in ref_g:
        np.testing.assert_allclose(np.array(g[name]), np.array(ref_g[name]), rtol=1e-5, atol=1e-7, err_msg=name)
    head_grad = "model.embed_tokens.weight" if tied else "lm_head.weight"
    assert np.abs(np.array(g[head_grad])).max() > 0  # the head does receive gradient through the checkpoint


def test_bad_chunk_size_is_a_user_error():
    tokens, _ = batch()
    with pytest.raises(ForgeError, match="chunk_size"):
        token_logps(tiny_llama(True), tokens, chunk_size=0)


# ---- DPO family: TRL's formulas, recomputed in float64 numpy ----


def log_sigmoid(x: np.ndarray) -> np.ndarray:
    return -np.logaddexp(0.0, -x)


def numpy_dpo(pc, pr, rc, rr, beta, loss_type, ls):
    logits = (pc - pr) - (rc - rr)
    losses = {
        "sigmoid": lambda: -log_sigmoid(beta * logits) * (1 - ls) - log_sigmoid(-beta * logits) * ls,
        "ipo": lambda: (logits - 1 / (2 * beta)) ** 2,
        "hinge": lambda: np.maximum(0.0, 1 - beta * logits),
        "robust": lambda: (-log_sigmoid(beta * logits) * (1 - ls) + log_sigmoid(-beta * logits) * ls) / (1 - 2 * ls),
    }[loss_type]()
    chosen, rejected = beta * (pc - rc), beta * (pr - rr)
    metrics = {
        "rewards/chosen": chosen.mean(),
        "rewards/rejected": rejected.mean(),
        "rewards/accuracies": (chosen > rejected).mean(),
        "rewards/margins": (chosen - rejected).mean(),
        "logps/chosen": pc.mean(),
        "logps/rejected": pr.mean(),
    }
    return losses.mean(), metrics


def random_logps(seed: int, n: int = 16, average: bool = False) -> list[np.ndarray]:
    """fp32-representable (policy chosen, policy rejected, ref chosen, ref rejected), policy near ref."""
    rng = np.random.default_rng(seed)
    scale = 1.0 if average else 40.0  # per-token means (IPO) vs sums over a completion
    rc, rr = -scale * rng.uniform(0.5, 2.0, n), -scale * rng.uniform(0.5, 2.0, n)
    pc, pr = rc + rng.normal(0, scale / 8, n), rr + rng.normal(0, scale / 8, n)
    return [x.astype(np.float32).astype(np.float64) for x in (pc, pr, rc, rr)]


CASES = [
    ("sigmoid", 0.0),
    ("sigmoid", 0.1),
    ("sigmoid", 0.3),
    ("ipo", 0.0),
    ("hinge", 0.0),
    ("robust", 0.0),
    ("robust", 0.1),
    ("robust", 0.4),
]


@pytest.mark.parametrize("loss_type,ls", CASES)
@pytest.mark.parametrize("beta", [0.1, 0.5])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_dpo_loss_matches_numpy(loss_type, ls, beta, seed):
    logps = random_logps(seed, average=loss_type == "ipo")
    loss, metrics = dpo_loss(*(mx.array(x) for x in logps), beta=beta, loss_type=loss_type, label_smoothing=ls)
    ref_loss, ref_metrics = numpy_dpo(*logps, beta, loss_type, ls)
    # Inputs are shared fp32 values; fp32 arithmetic on log-ratios of size <= ~100 costs ~1e-5 absolute.
    assert loss.item() == pytest.approx(ref_loss, rel=1e-5, abs=1e-5)
    assert metrics.keys() == ref_metrics.keys()
    for name, ref in ref_metrics.items():
        assert metrics[name].item() == pytest.approx(ref, rel=1e-5, abs=1e-5), name


@pytest.mark.parametrize("ls", [0.0, 0.2])
def test_dpo_at_reference_is_log2_with_zero_rewards(ls):
    pc, pr, _, _ = (mx.array(x) for x in random_logps(3))
    loss, metrics = dpo_loss(pc, pr, pc, pr, beta=0.1, loss_type="sigmoid", label_smoothing=ls)
    # logits are exactly 0, so -log sigmoid(0) = log 2 whatever the smoothing; fp32 rounding of log 2 only.
    assert loss.item() == pytest.approx(math.log(2), rel=1e-6)
    for name in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"):
        assert metrics[name].item() == 0.0, name


def test_dpo_sigmoid_gradient_matches_the_closed_form():
    pc, pr, rc, rr = (mx.array(x) for x in random_logps(4))
    beta = 0.1
    grad = mx.grad(lambda p: dpo_loss(p, pr, rc, rr, beta=beta)[0])(pc)
    logits = np.array((pc - pr) - (rc - rr), dtype=np.float64)
    # d/d pc of mean(-log sigmoid(beta * logits)) = -beta * sigmoid(-beta * logits) / n; fp32, entries ~1e-3.
    ref = -beta / (1 + np.exp(beta * logits)) / logits.size
    np.testing.assert_allclose(np.array(grad), ref, rtol=1e-5, atol=1e-9)


def test_unknown_dpo_loss_type_lists_the_valid_ones():
    x = mx.zeros((2,))
    with pytest.raises(ForgeError, match="sigmoid, ipo, hinge, robust"):
        dpo_loss(x, x, x, x, loss_type="kto")


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(loss_type="robust", label_smoothing=0.5), "label_smoothing"),
        (dict(loss_type="sigmoid", label_smoothing=-0.1), "label_smoothing"),
        (dict(loss_type="hinge", label_smoothing=0.1), "no effect"),
        (dict(beta=0.0), "beta"),
    ],
)
def test_invalid_dpo_settings_are_user_errors(kwargs, match):
    x = mx.zeros((2,))
    with pytest.raises(ForgeError, match=match):
        dpo_loss(x, x, x, x, **kwargs)
