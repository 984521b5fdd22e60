"""Length-bucketed, seeded, resumable batches as numpy arrays, shared by the MLX and torch backends."""

from __future__ import annotations

import zlib
from bisect import bisect_left, insort
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from forge_mlx.data.preference import PreferencePair
from forge_mlx.data.sft import SFTExample
from forge_mlx.errors import ForgeError

_Seq = tuple[np.ndarray, np.ndarray, np.ndarray | None]  # tokens, loss_mask, segment ids (packed only)


@dataclass(frozen=True)
class Batch:
    """Padded rows; the loss pairs logits[:, :-1] with tokens[:, 1:], so T - 1 is the rounded length."""

    tokens: np.ndarray  # (R, T) int32, R = group * B
    loss_mask: np.ndarray  # (R, T) bool: token t is a target (predicted from tokens < t)
    lengths: np.ndarray  # (R,) int32 real tokens per row; 0 for a filler row
    example_ids: tuple[tuple[int, ...], ...]  # (B,) the examples each row holds; () for a filler row
    segment_ids: np.ndarray | None = None  # (R, T) int32 when packed: 1..k per example, 0 on padding
    group: int = 1  # 2 for preference pairs: rows [:B] chosen, rows [B:] rejected, pair i in rows i and B + i

    @property
    def padding_fraction(self) -> float:
        return 1.0 - float(self.lengths.sum()) / self.tokens.size


def padded_length(n: int) -> int:
    """Row length T for a longest row of n tokens. T - 1 (the model input) rounds up to a multiple of the largest
    power of two <= (n - 1) / 16, at most 32: rounding adds under 1/16 of a row (a fixed multiple of 8 added ~9 %
    to short chat rows), and each doubling of length compiles at most 16 step shapes."""
    m = max(n - 1, 1)
    step = min(32, 1 << max(0, (m // 16).bit_length() - 1))
    return 1 + step * -(-m // step)


def pack_examples(examples: list[SFTExample], capacity: int) -> list[tuple[_Seq, tuple[int, ...]]]:
    """Best-fit-decreasing packing of examples into rows of at most `capacity` tokens, with segment ids."""
    order = sorted(range(len(examples)), key=lambda i: -len(examples[i][0]))
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (room left, row), sorted: the tightest row that fits comes first
    for i in order:
        n = len(examples[i][0])
        if n > capacity:
            raise ValueError(f"example {i} has {n} tokens, more than the packing capacity {capacity}")
        k = bisect_left(free, (n, -1))
        room, row = free.pop(k) if k < len(free) else (capacity, len(rows))
        if row == len(rows):
            rows.append([])
        rows[row].append(i)
        if room - n > 0:
            insort(free, (room - n, row))
    packed = []
    for ids in rows:
        tokens = np.concatenate([np.asarray(examples[i][0], np.int32) for i in ids])
        mask = np.concatenate([np.asarray(examples[i][1], bool) for i in ids])
        segments = np.concatenate([np.full(len(examples[i][0]), s, np.int32) for s, i in enumerate(ids, 1)])
        mask[np.flatnonzero(np.diff(segments, prepend=0))] = False  # a segment's first token has no context
        packed.append(((tokens, mask, segments), tuple(ids)))
    return packed


def block_causal_mask(segment_ids: np.ndarray) -> np.ndarray:
    """Attention mask for packed rows: causal within a segment, blind across segments (pads see pads)."""
    t = segment_ids.shape[1]
    same = segment_ids[:, :, None] == segment_ids[:, None, :]  # (B, T, T)
    return (same & np.tril(np.ones((t, t), bool)))[:, None]  # (B, 1, T, T), True = may attend


def shard(batch: Batch, rank: int, world_size: int) -> Batch:
    """This rank's rows for data-parallel training: every world_size-th example, pairs kept together."""
    b = len(batch.example_ids)
    if not 0 <= rank < world_size:
        raise ForgeError(f"rank {rank} is outside a world of size {world_size}")
    if b % world_size:
        raise ForgeError(
            f"batch_size {b} is not divisible by the world size {world_size}",
            hint="choose a batch_size that is a multiple of the number of processes",
        )
    rows = np.concatenate([g * b + np.arange(rank, b, world_size) for g in range(batch.group)])
    segments = None if batch.segment_ids is None else batch.segment_ids[rows]
    return Batch(
        batch.tokens[rows],
        batch.loss_mask[rows],
        batch.lengths[rows],
        batch.example_ids[rank::world_size],
        segments,
        batch.group,
    )


class BatchStream:
    """Endless batches, epoch after epoch; (seed, epoch, index) fix every batch, so a run resumes exactly.

    Each epoch sorts examples by length (ties in a seeded random order), cuts them into batches (the one short
    batch holds the shortest examples and is filled with empty rows, so no example is lost or repeated) and
    visits the batches in a seeded random order.
    """

    def __init__(
        self,
        examples: list[SFTExample] | list[PreferencePair],
        batch_size: int,
        *,
        seed: int = 0,
        shuffle: bool = True,
        pack: bool = False,
        max_seq_length: int | None = None,
        pad_id: int = 0,
    ):
        if not examples:
            raise ForgeError("no examples to batch", hint="check the data file and max_seq_length")
        if batch_size < 1:
            raise ForgeError(f"batch_size must be at least 1, got {batch_size}")
        self.group = 2 if isinstance(examples[0], PreferencePair) else 1
        if pack and (self.group != 1 or max_seq_length is None):
            raise ForgeError("packing needs SFT examples and a max_seq_length", hint="set pack: false")
        self.settings = dict(seed=seed, shuffle=shuffle, pack=pack, max_seq_length=max_seq_length)
        self.batch_size, self.pad_id = batch_size, pad_id
        self.fingerprint = _fingerprint(examples)
        self._units = (
            [((seq,), ids) for seq, ids in pack_examples(examples, max_seq_length)]
            if pack
            else [_unit(ex, i) for i, ex in enumerate(examples)]
        )
        self._lengths = np.array([max(len(s[0]) for s in seqs) for seqs, _ in self._units], np.int64)
        self.batches_per_epoch = -(-len(self._units) // batch_size)
        self.epoch, self.index = 0, 0  # epoch = full passes completed; index = next batch within the epoch
        self.real_tokens, self.total_tokens = 0, 0
        self._plan: tuple[int, list[np.ndarray]] = (-1, [])

    def __iter__(self) -> Iterator[Batch]:
        return self

    def __next__(self) -> Batch:
        if self._plan[0] != self.epoch:
            self._plan = (self.epoch, self._epoch_plan(self.epoch))
        batch = self._collate(self._plan[1][self.index])
        self.index += 1
        if self.index == self.batches_per_epoch:
            self.epoch, self.index = self.epoch + 1, 0
        self.real_tokens += int(batch.lengths.sum())
        self.total_tokens += batch.tokens.size
        return batch

    @property
    def padding_fraction(self) -> float:
        """Padded tokens / all tokens over every batch served so far (resumed runs include earlier ones)."""
        return 1.0 - self.real_tokens / self.total_tokens if self.total_tokens else 0.0

    def state(self) -> dict[str, Any]:
        """JSON-serialisable position and settings, for the checkpoint."""
        return dict(
            self.settings,
            batch_size=self.batch_size,
            epoch=self.epoch,
            index=self.index,
            real_tokens=self.real_tokens,
            total_tokens=self.total_tokens,
            **self.fingerprint,
        )

    @classmethod
    def from_state(cls, examples: list, state: dict[str, Any], *, pad_id: int = 0) -> BatchStream:
        """Rebuild a stream at a recorded position; refuses data that differs from the checkpoint's."""
        settings = {k: state[k] for k in ("seed", "shuffle", "pack", "max_seq_length")}
        stream = cls(examples, state["batch_size"], pad_id=pad_id, **settings)
        if any(stream.fingerprint[k] != state[k] for k in stream.fingerprint):
            raise ForgeError(
                f"the data differ from the checkpoint's ({stream.fingerprint['n_examples']} examples now, "
                f"{state['n_examples']} then, or their lengths changed)",
                hint="resume with the same data files and length settings, or start a new run",
            )
        stream.epoch, stream.index = state["epoch"], state["index"]
        stream.real_tokens, stream.total_tokens = state["real_tokens"], state["total_tokens"]
        return stream

    def _epoch_plan(self, epoch: int) -> list[np.ndarray]:
        n, b = len(self._units), self.batch_size
        rng = np.random.default_rng([self.settings["seed"], epoch])
        tiebreak = rng.permutation(n) if self.settings["shuffle"] else np.arange(n)
        order = np.lexsort((tiebreak, self._lengths))  # by length; equal lengths in a per-epoch order
        edges = sorted({0, *range(n % b, n + 1, b)})  # the short batch (if any) takes the shortest examples
        batches = [order[lo:hi] for lo, hi in zip(edges[:-1], edges[1:], strict=True)]
        visit = rng.permutation(len(batches)) if self.settings["shuffle"] else range(len(batches))
        return [batches[i] for i in visit]

    def _collate(self, units: np.ndarray) -> Batch:
        b, t = self.batch_size, padded_length(int(self._lengths[units].max()))
        tokens = np.full((self.group * b, t), self.pad_id, np.int32)  # (R, T)
        mask = np.zeros((self.group * b, t), bool)  # (R, T)
        lengths = np.zeros(self.group * b, np.int32)  # (R,)
        segments = np.zeros((self.group * b, t), np.int32) if self.settings["pack"] else None
        for j, u in enumerate(units):
            for g, (tok, msk, seg) in enumerate(self._units[u][0]):
                row, n = g * b + j, len(tok)
                tokens[row, :n], mask[row, :n], lengths[row] = tok, msk, n
                if segments is not None:
                    segments[row, :n] = seg
        ids = tuple(self._units[u][1] for u in units) + ((),) * (b - len(units))
        return Batch(tokens, mask, lengths, ids, segments, self.group)


def eval_batches(examples: list, batch_size: int, *, pad_id: int = 0) -> Iterator[Batch]:
    """One pass in length order, unshuffled, for evaluation."""
    stream = BatchStream(examples, batch_size, shuffle=False, pad_id=pad_id)
    for _ in range(stream.batches_per_epoch):
        yield next(stream)


def _unit(example: SFTExample | PreferencePair, i: int) -> tuple[tuple[_Seq, ...], tuple[int, ...]]:
    sides = tuple(example) if isinstance(example, PreferencePair) else (example,)
    return tuple((np.asarray(t, np.int32), np.asarray(m, bool), None) for t, m in sides), (i,)


def _fingerprint(examples: list) -> dict[str, int]:
    """Cheap identity of the encoded data (count, every sequence length): catches resuming on other data."""
    sides = [s for ex in examples for s in (ex if isinstance(ex, PreferencePair) else (ex,))]
    lengths = np.array([len(t) for t, _ in sides], np.int64)
    return {"n_examples": len(examples), "lengths_crc32": zlib.crc32(lengths.tobytes())}
