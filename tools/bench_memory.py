"""Peak memory of one training micro-step on long sequences, with and without the chunked loss (issue #11).

    python tools/bench_memory.py [--seq 2048] [--chunks none,256,128,64] [--batch 1] [--model PATH]

Each case runs in its own process (a clean allocator and peak): SmolLM2 in fp32 with LoRA-initialised adapters
on q/k/v/o (the loss's memory does not depend on the init), the compiled micro-step `forge-mlx train` runs
(forward, backward, gradient sum) with block checkpointing, compiled as training runs it (chunked: eager) and
the other way round for comparison. Peak = mx.get_peak_memory() after a reset
taken once the model and adapters are resident, so it is what training adds on top of the weights. The
anchor is the same step with the full (B, T, V) logits (chunk none); the ratio is chunked / full.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import ROOT, emit, header, machine, pin_threads, ratio, run_worker, table, write_results  # noqa: E402

DEFAULT_MODEL = ROOT / "models" / "SmolLM2-135M-Instruct"


def worker(args: argparse.Namespace) -> dict:
    """One case: peak bytes of the first and second compiled micro-steps on random tokens of length seq."""
    import time

    import mlx.core as mx

    from forge_mlx.config import load_config
    from forge_mlx.models import load_model
    from forge_mlx.pipeline import adapt, make_optimizer, sft_loss_fn
    from forge_mlx.train import checkpoint_blocks, make_step

    config = load_config(
        None,
        [f"model={args.model}", "output_dir=/tmp/unused", "dtype=float32"]
        + ["adapter.init=lora", "adapter.residual=none"],
    )
    mx.random.seed(0)
    model, _, hf_config = load_model(config.model, config.dtype)
    adapt(model, config, log=lambda *_: None)
    checkpoint_blocks(model)
    chunk = None if args.chunk == "none" else int(args.chunk)
    optimizer = make_optimizer(1e-4, 10, 1, 0.1, 0.0)
    micro, _, _ = make_step(model, optimizer, sft_loss_fn(chunk), 1.0, compile_micro=args.compiled)
    tokens = mx.random.randint(0, hf_config["vocab_size"], (args.batch, args.seq + 1)).astype(mx.int32)
    mask = mx.ones(tokens.shape, mx.bool_)
    mx.eval(model.parameters(), tokens, mask)
    resident = mx.get_active_memory()
    peaks, seconds = [], []
    for _ in range(2):  # the first call also compiles
        mx.clear_cache()
        mx.reset_peak_memory()
        start = time.perf_counter()
        loss, _, _, grad = micro(None, tokens, mask)
        mx.eval(loss, grad)
        seconds.append(time.perf_counter() - start)
        peaks.append(mx.get_peak_memory() - resident)
        del loss, grad
    return {
        "peak_mb": max(peaks) / 2**20,
        "resident_mb": resident / 2**20,
        "step_s": seconds[-1],
        "vocab": hf_config["vocab_size"],
    }


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.worker:
        emit(worker(args))
        return {}
    info = machine()
    print(header("peak memory of one training micro-step (tools/bench_memory.py)", info))
    chunks = args.chunks.split(",")
    cases = [(chunk, chunk == "none") for chunk in chunks]  # as `forge-mlx train` runs them
    cases += [(chunk, chunk != "none") for chunk in chunks[:2]]  # the anchor eager, one chunk size compiled
    results = []
    for chunk, compiled in cases:
        worker_args = [
            str(Path(__file__)),
            "--worker",
            f"--model={args.model}",
            f"--seq={args.seq}",
            f"--batch={args.batch}",
            f"--chunk={chunk}",
            f"--threads={args.threads}",
            "--compiled" if compiled else "--no-compiled",
        ]
        result = run_worker(worker_args)
        results.append({"chunk": chunk, "compiled": compiled, **result})
        print(f"  chunk {chunk:>5} compiled {compiled}: peak {result['peak_mb']:.0f} MB, {result['step_s']:.1f} s")
    vocab = results[0]["vocab"]
    logits_mb = args.batch * args.seq * vocab * 4 / 2**20
    rows = []
    anchor = results[0]  # full logits, compiled: training without loss_chunk_size
    for r in results:
        rows.append([r["chunk"], r["compiled"], r["peak_mb"], ratio(r["peak_mb"], anchor["peak_mb"]), r["step_s"]])
    text = table(["loss_chunk_size", "micro-step compiled", "peak MB", "vs full logits", "step s"], rows, digits=3)
    print(
        f"\nseq {args.seq}, batch {args.batch}, vocab {vocab}: one fp32 (B, T, V) logits tensor is {logits_mb:.0f} MB; "
        f"weights resident {results[0]['resident_mb']:.0f} MB (not counted)\n{text}"
    )
    payload = {"machine": info, "seq": args.seq, "batch": args.batch, "logits_mb": logits_mb, "results": results}
    print(f"results: {write_results('memory', payload)}")
    return payload


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(DEFAULT_MODEL))
    parser.add_argument("--seq", type=int, default=2048, help="model input positions (T - 1)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--chunks", default="none,256,128,64", help="loss_chunk_size values; none (full logits) first")
    parser.add_argument("--threads", type=int, default=0, help="BLAS threads (0 = library default)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--chunk", default="none", help=argparse.SUPPRESS)
    parser.add_argument("--compiled", action=argparse.BooleanOptionalAction, default=True, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


if __name__ == "__main__":
    pin_threads(default=0)
    main()
