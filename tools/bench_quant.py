"""NF4 quantization time: forge-mlx's bitsandbytes-exact quantizer vs bitsandbytes itself, on the CPU.

    python tools/bench_quant.py [--shape 4096 4096] [--reps 5] [--threads 1]

Both quantize the same float32 weight with blocks of 64 and double quantization (QLoRA's setting) and must give the
same bytes (checked here; tests/test_quant_nf4.py checks it properly). forge-mlx: `quant.nf4.quantize_nf4` (numpy,
shared with the torch backend) on an mx.array; bitsandbytes: `bitsandbytes.functional.quantize_4bit` on a CPU
torch tensor. Interleaved rounds, medians, ratio forge-mlx / bitsandbytes (< 1: forge-mlx faster). The dequantize
round trip (what QPiSSA and the residual init pay) is timed for forge-mlx too.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import (  # noqa: E402
    header,
    interleaved,
    machine,
    median,
    pin_threads,
    ratio,
    table,
    timed,
    torch_threads,
    write_results,  # noqa: E402
)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    import bitsandbytes.functional as bnbf
    import mlx.core as mx
    import numpy as np
    import torch

    from forge_mlx.quant.nf4 import dequantize_nf4, quantize_nf4

    torch_threads(args.threads)
    info = machine()
    print(header("NF4 quantization vs bitsandbytes (tools/bench_quant.py)", info))
    weight = np.random.default_rng(0).standard_normal(tuple(args.shape)).astype(np.float32) * 0.02
    w_mx, w_torch = mx.array(weight), torch.from_numpy(weight)

    def ours():
        t = quantize_nf4(w_mx, 64, True)
        mx.eval(t.packed, t.absmax)
        return t

    def theirs():
        return bnbf.quantize_4bit(w_torch, blocksize=64, compress_statistics=True, quant_type="nf4")

    packed_ours = np.array(ours().packed)
    packed_theirs = theirs()[0].numpy().reshape(-1)
    same = bool(np.array_equal(packed_ours, packed_theirs))
    times = interleaved(
        {
            "forge-mlx quantize_nf4": lambda: timed(ours),
            "bitsandbytes quantize_4bit": lambda: timed(theirs),
            "forge-mlx quantize + dequantize": lambda: timed(lambda: mx.eval(dequantize_nf4(ours()))),
        },
        args.reps,
        log=lambda *_: None,
    )
    medians = {name: median(ts) for name, ts in times.items()}
    anchor = medians["bitsandbytes quantize_4bit"]
    rows = [[name, s, ratio(s, anchor)] for name, s in medians.items()]
    print(f"weight {args.shape[0]} x {args.shape[1]} fp32, blocks of 64, double quant; packed bytes equal: {same}")
    print(table(["operation", "median s", "vs bitsandbytes quantize"], rows))
    payload = {"machine": info, "shape": args.shape, "same_bytes": same, "seconds": times, "medians": medians}
    print(f"results: {write_results('quant', payload)}")
    return payload


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", type=int, nargs=2, default=[4096, 4096])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="BLAS/torch threads (0 = library defaults)")
    return parser.parse_args(argv)


if __name__ == "__main__":
    pin_threads()
    main()
