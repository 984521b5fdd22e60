"""Padding fraction of the batches forge-mlx trains on vs mlx_lm's trainer, on the same data (issue #11).

    python tools/bench_padding.py [--data data/sft] [--batch 4] [--epochs 3] [--max-seq 256]

Both sides tokenize the same chat rows with SmolLM2's tokenizer and run their own batching for whole epochs:
forge-mlx's BatchStream (length-sorted by tokens, rounded by data.batching.padded_length) and mlx_lm's
iterate_batches over its CacheDataset, as `mlx_lm.lora` trains. Padding = 1 - real tokens / (rows x T) of the
batches as computed. Distinct (rows, T) shapes count the compiled-step traces each side pays. No model runs.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import ROOT, pin_threads, ratio, table, write_results  # noqa: E402

MODEL = ROOT / "models" / "SmolLM2-135M-Instruct"


def forge_batches(path: Path, tokenizer, batch: int, max_seq: int, epochs: int) -> list[tuple[int, int, int]]:
    """(rows, T, real tokens) of every batch forge-mlx's SFT phase draws in `epochs` passes."""
    from forge_mlx.data.batching import BatchStream
    from forge_mlx.data.jsonl import load_split
    from forge_mlx.data.sft import encode_sft_split

    split = encode_sft_split(load_split(path, "train", kind="sft"), tokenizer, max_seq_length=max_seq)
    stream = BatchStream(split.examples, batch, seed=0, max_seq_length=max_seq)
    out = []
    for _ in range(stream.batches_per_epoch * epochs):
        b = next(stream)
        out.append((b.tokens.shape[0], b.tokens.shape[1], int(b.lengths.sum())))
    return out


def mlx_lm_batches(rows: list[dict], tokenizer, batch: int, max_seq: int, epochs: int) -> list[tuple[int, int, int]]:
    """The same for mlx_lm.tuner.trainer.iterate_batches over CacheDataset(create_dataset(...))."""
    from mlx_lm.tuner.datasets import CacheDataset, create_dataset
    from mlx_lm.tuner.trainer import iterate_batches

    dataset = CacheDataset(create_dataset(rows, tokenizer, SimpleNamespace(mask_prompt=True)))
    n_batches = len(dataset) // batch
    batches = iterate_batches(dataset, batch, max_seq, loop=True, seed=0)
    out = []
    for _ in range(n_batches * epochs):
        tokens, lengths = next(batches)
        out.append((tokens.shape[0], tokens.shape[1], int(lengths[:, 1].sum())))
    return out


def summary(batches: list[tuple[int, int, int]]) -> dict:
    total = sum(r * t for r, t, _ in batches)
    real = sum(n for _, _, n in batches)
    return {
        "batches": len(batches),
        "padding": 1 - real / total,
        "computed_tokens": total,
        "real_tokens": real,
        "shapes": len({(r, t) for r, t, _ in batches}),
    }


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    from mlx_lm.utils import load_tokenizer

    tokenizer = load_tokenizer(Path(args.model))
    path = Path(args.data) / "train.jsonl" if Path(args.data).is_dir() else Path(args.data)
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    results = {
        "forge-mlx": summary(forge_batches(path, tokenizer, args.batch, args.max_seq, args.epochs)),
        "mlx_lm": summary(mlx_lm_batches(rows, tokenizer, args.batch, args.max_seq, args.epochs)),
    }
    ours, theirs = results["forge-mlx"], results["mlx_lm"]
    rows_out = [
        [name, r["batches"], r["padding"], r["computed_tokens"], r["real_tokens"], r["shapes"]]
        for name, r in results.items()
    ]
    text = table(["batching", "batches", "padding", "computed tokens", "real tokens", "step shapes"], rows_out)
    computed = ratio(ours["computed_tokens"] / ours["real_tokens"], theirs["computed_tokens"] / theirs["real_tokens"])
    print(f"{path}, batch {args.batch}, {args.epochs} epochs, max_seq {args.max_seq}\n{text}")
    print(f"computed tokens per real token, forge-mlx / mlx_lm: {computed:.3f}")
    payload = {"data": str(path), "batch": args.batch, "epochs": args.epochs, "results": results, "ratio": computed}
    print(f"results: {write_results('padding', payload)}")
    return payload


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(ROOT / "data" / "sft"))
    parser.add_argument("--model", default=str(MODEL), help="whose tokenizer to use")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--max-seq", type=int, default=256)
    return parser.parse_args(argv)


if __name__ == "__main__":
    pin_threads(default=0)
    main()
