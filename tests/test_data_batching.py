"""Batching: every example once per epoch, hand-computed padding, exact resume, sharding and packing."""

import json

import numpy as np
import pytest

from forge_mlx.data import BatchStream, PreferencePair, block_causal_mask, eval_batches, pack_examples, shard
from forge_mlx.data.batching import padded_length
from forge_mlx.errors import ForgeError


def examples_of(lengths, start=1):
    """Example i holds tokens start+1000*i.. so a row traces back to its example; first token masked."""
    return [
        (list(range(start + 1000 * i, start + 1000 * i + n)), [False] + [j % 2 == 0 for j in range(1, n)])
        for i, n in enumerate(lengths)
    ]


def random_lengths(n, seed=0):
    return np.random.default_rng(seed).integers(5, 300, n).tolist()


def epoch(stream):
    return [next(stream) for _ in range(stream.batches_per_epoch)]


def test_every_example_appears_once_per_epoch_in_its_row():
    examples = examples_of(random_lengths(53))
    stream = BatchStream(examples, 8, seed=3)
    assert stream.batches_per_epoch == 7  # ceil(53 / 8)
    for e in range(2):
        seen = []
        for batch in epoch(stream):
            assert batch.tokens.shape[0] == 8 and batch.tokens.dtype == np.int32 and batch.loss_mask.dtype == bool
            for row, ids in enumerate(batch.example_ids):
                if not ids:  # a filler row: empty and never a target
                    assert batch.lengths[row] == 0 and not batch.loss_mask[row].any()
                    continue
                tokens, mask = examples[ids[0]]
                n = len(tokens)
                assert batch.lengths[row] == n and batch.tokens[row, :n].tolist() == tokens
                assert batch.loss_mask[row, :n].tolist() == mask and not batch.loss_mask[row, n:].any()
                assert (batch.tokens[row, n:] == 0).all()
            seen += [i for ids in batch.example_ids for i in ids]
        assert sorted(seen) == list(range(53)) and stream.epoch == e + 1


def test_padding_fraction_matches_a_hand_computation():
    stream = BatchStream(examples_of([17, 3, 9, 5, 10]), 2, shuffle=False)
    # sorted 3 | 5 9 | 10 17; the short batch (shortest example + a filler row) comes first.
    # rows this short are not rounded (T - 1 < 32): longest 3 -> T 3, 9 -> 9, 17 -> 17
    batches = epoch(stream)
    assert [b.tokens.shape for b in batches] == [(2, 3), (2, 9), (2, 17)]
    assert [b.example_ids for b in batches] == [((1,), ()), ((3,), (2,)), ((4,), (0,))]
    # exact: these are ratios of small integers, computed once in float64
    expected = [1 - 3 / 6, 1 - 14 / 18, 1 - 27 / 34]
    assert [b.padding_fraction for b in batches] == pytest.approx(expected, abs=1e-12)
    assert stream.padding_fraction == pytest.approx(1 - 44 / 58, abs=1e-12)


def test_padded_length_rounds_the_model_input_by_under_a_sixteenth():
    assert [padded_length(n) for n in (2, 17, 33, 37, 66, 130, 300, 1000, 2000)] == [
        2,
        17,
        33,
        37,
        69,
        137,
        305,
        1025,
        2017,
    ]  # hand-computed: step 1 below 32 inputs, 2 to 63, 4 to 127, 8 to 255, 16 to 511, then 32
    shapes: dict[int, set[int]] = {}
    for n in range(2, 5000):
        t, m = padded_length(n), n - 1
        assert t >= n and (t - n) * 16 < max(m, 16)  # rounding wastes under 1/16 of the row
        if m < 1024:  # past that the step stays 32 (as mlx-lm pads), so longer octaves have more shapes
            shapes.setdefault(m.bit_length(), set()).add(t)
    assert max(len(s) for s in shapes.values()) <= 16 + 1  # per doubling of length (+1: the next octave's first)


def test_padding_is_small_on_typical_data():
    lengths = np.random.default_rng(1).lognormal(np.log(250), 0.6, 2000).astype(int).clip(8, 2048).tolist()
    stream = BatchStream(examples_of(lengths), 8, seed=0)
    epoch(stream)
    assert stream.padding_fraction < 0.05


def test_order_is_seeded_and_changes_between_epochs():
    examples = examples_of(random_lengths(40))
    ids = lambda batches: [b.example_ids for b in batches]
    a, b = BatchStream(examples, 4, seed=7), BatchStream(examples, 4, seed=7)
    first = ids(epoch(a))
    assert first == ids(epoch(b)) and ids(epoch(a)) != first
    assert ids(epoch(BatchStream(examples, 4, seed=8))) != first


def test_state_restore_gives_the_same_next_batches():
    examples = examples_of(random_lengths(30))
    stream = BatchStream(examples, 4, seed=5)
    for _ in range(9):  # past the first epoch's 8 batches
        next(stream)
    state = json.loads(json.dumps(stream.state()))  # what a checkpoint stores
    resumed = BatchStream.from_state(examples, state)
    assert (resumed.epoch, resumed.index) == (1, 1) and resumed.padding_fraction == stream.padding_fraction
    for _ in range(10):
        x, y = next(stream), next(resumed)
        assert x.example_ids == y.example_ids and np.array_equal(x.tokens, y.tokens)
        assert np.array_equal(x.loss_mask, y.loss_mask)
    with pytest.raises(ForgeError, match="the data differ from the checkpoint"):
        BatchStream.from_state(examples[:-1], state)


def test_eval_batches_cover_everything_in_length_order():
    lengths = random_lengths(10)
    batches = list(eval_batches(examples_of(lengths), 4))
    ids = [i for b in batches for ids in b.example_ids for i in ids]
    assert ids == sorted(range(10), key=lambda i: lengths[i])


def pairs_of(n):
    chosen, rejected = examples_of(random_lengths(n, 1)), examples_of(random_lengths(n, 2), start=500)
    return [PreferencePair(c, r) for c, r in zip(chosen, rejected, strict=True)]


def test_preference_batches_hold_chosen_then_rejected_rows():
    pairs = pairs_of(12)
    batch = next(BatchStream(pairs, 4, seed=0))
    assert batch.group == 2 and batch.tokens.shape[0] == 8
    for j, (i,) in enumerate(batch.example_ids):
        for side, row in ((pairs[i].chosen, j), (pairs[i].rejected, 4 + j)):
            assert batch.tokens[row, : len(side[0])].tolist() == side[0]
            assert batch.loss_mask[row, : len(side[1])].tolist() == side[1]


def test_shard_splits_rows_evenly_and_keeps_pairs_together():
    batch = next(BatchStream(pairs_of(8), 4, seed=0))
    parts = [shard(batch, r, 2) for r in range(2)]
    assert [p.example_ids for p in parts] == [batch.example_ids[0::2], batch.example_ids[1::2]]
    for r, part in enumerate(parts):
        # rank r holds pairs r and r + 2: chosen rows r, r + 2 and rejected rows 4 + r, 6 + r
        assert np.array_equal(part.tokens, batch.tokens[[r, r + 2, 4 + r, 6 + r]])
        assert np.array_equal(part.lengths, batch.lengths[[r, r + 2, 4 + r, 6 + r]])
    with pytest.raises(ForgeError, match="batch_size 4 is not divisible by the world size 3"):
        shard(batch, 0, 3)


def test_packing_fits_rows_and_masks_segment_starts():
    examples = examples_of(random_lengths(40))
    rows = pack_examples(examples, 512)
    ids = sorted(i for _, row_ids in rows for i in row_ids)
    assert ids == list(range(40))
    assert len(rows) <= -(-sum(len(t) for t, _ in examples) // 512) + 1  # within one row of the ideal
    for (tokens, mask, segments), row_ids in rows:
        assert len(tokens) <= 512
        expected_tokens = [t for i in row_ids for t in examples[i][0]]
        expected_mask = [m for i in row_ids for m in examples[i][1]]  # examples already mask their first token
        assert tokens.tolist() == expected_tokens and mask.tolist() == expected_mask
        assert segments.tolist() == [s for s, i in enumerate(row_ids, 1) for _ in examples[i][0]]
    text_like = [(list(range(5)), [True] * 5), (list(range(3)), [True] * 3)]  # unmasked first tokens
    (_, mask, _), _ = pack_examples(text_like, 8)[0]
    assert mask.tolist() == [False, True, True, True, True, False, True, True]
    stream = BatchStream(examples, 2, pack=True, max_seq_length=512)
    batch = next(stream)
    assert batch.segment_ids.shape == batch.tokens.shape
    with pytest.raises(ForgeError, match="packing needs SFT examples"):
        BatchStream(pairs_of(4), 2, pack=True, max_seq_length=512)


def test_block_causal_mask_matches_a_loop():
    segments = np.array([[1, 1, 2, 2, 2, 0, 0], [1, 1, 1, 1, 1, 1, 1]])
    mask = block_causal_mask(segments)
    assert mask.shape == (2, 1, 7, 7)
    for b in range(2):
        for i in range(7):
            for j in range(7):
                assert mask[b, 0, i, j] == (j <= i and segments[b, i] == segments[b, j])


def test_packed_row_with_block_mask_matches_separate_forwards_in_mlx_llama():
    """mlx_lm's llama Model.__call__ takes no mask, but its layers do: the loop runs them with this mask."""
    mx = pytest.importorskip("mlx.core")
    pytest.importorskip("mlx_lm")
    from helpers import tiny_llama

    model = tiny_llama(0, hidden_size=32, intermediate_size=64, vocab_size=64, tie_word_embeddings=True)
    a, b = [3, 9, 4, 17, 22], [5, 8, 61, 2, 40, 11, 7]
    (packed, _, packed_segments), ids = pack_examples([(a, [True] * 5), (b, [True] * 7)], 16)[0]
    assert ids == (1, 0)  # best-fit-decreasing puts the longer example first
    tokens, segments = np.zeros((1, 16), np.int32), np.zeros((1, 16), np.int32)  # 4 padding tokens
    tokens[0, :12], segments[0, :12] = packed, packed_segments

    h = model.model.embed_tokens(mx.array(tokens))
    attention = mx.array(block_causal_mask(segments))
    for layer in model.model.layers:
        h = layer(h, attention)
    packed_logits = np.array(model.model.embed_tokens.as_linear(model.model.norm(h)))
    alone_b = np.array(model(mx.array([b])))[0]
    alone_a = np.array(model(mx.array([a])))[0]
    # float32 and RoPE scores depend only on relative positions: a shifted segment differs by rounding (~1e-6)
    np.testing.assert_allclose(packed_logits[0, :7], alone_b, atol=1e-4)
    np.testing.assert_allclose(packed_logits[0, 7:12], alone_a, atol=1e-4)
    plain = np.array(model(mx.array(tokens)))[0, 7:12]  # the default causal mask lets segment 2 see segment 1
    assert np.abs(plain - alone_a).max() > 1e-2
