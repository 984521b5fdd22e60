"""Training data shared by every backend: JSONL reading, SFT/preference encoding, batching (numpy only)."""

from forge_mlx.data.batching import Batch, BatchStream, block_causal_mask, eval_batches, pack_examples, shard
from forge_mlx.data.jsonl import Dataset, Record, load_split, read_jsonl, validate_row
from forge_mlx.data.preference import PreferencePair, encode_preference, encode_preference_split
from forge_mlx.data.sft import EncodedSplit, SFTExample, encode_sft, encode_sft_split

__all__ = [
    "Batch",
    "BatchStream",
    "Dataset",
    "EncodedSplit",
    "PreferencePair",
    "Record",
    "SFTExample",
    "block_causal_mask",
    "encode_preference",
    "encode_preference_split",
    "encode_sft",
    "encode_sft_split",
    "eval_batches",
    "load_split",
    "pack_examples",
    "read_jsonl",
    "shard",
    "validate_row",
]
