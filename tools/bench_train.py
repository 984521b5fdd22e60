"""Training benchmarks: forge-mlx SFT speed and memory vs mlx_lm LoRA, PiSSA vs LoRA loss, utilisation, DPO cost.

Run: python tools/bench_train.py [--quick] [--backend torch]. Prints tables, writes bench_results/bench_train-*.json.
Every timed run is a fresh subprocess (its own peak memory), run in rounds (A B C A B C ...), medians reported.
Step time is the time between two batch requests of the training loop, so forge-mlx and mlx_lm are timed the same
way; the first step and any step on a batch shape not seen before (MLX recompiles the step) are left out.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import bench_common as bc

THREADS = bc.pin_threads()  # thread count and OpenBLAS preload, before mlx or torch is imported

from bench_common import (  # noqa: E402
    emit,
    header,
    machine,
    median,
    ratio,
    run_worker,
    summarize,
    table,
    write_results,
)
from bench_train_workers import HF_MODEL, MLX_4BIT, WORKERS  # noqa: E402

# ---------------------------------------------------------------------------------------------------- sections


def call(name: str, spec: dict, env: dict | None = None) -> dict:
    args = [str(Path(__file__)), "--worker", name, "--spec", json.dumps(spec), "--threads", str(THREADS)]
    return run_worker(args, env=env)


def ensure_4bit_model(log=print) -> Path:
    """The 4-bit SmolLM2 that mlx_lm trains on: mlx_lm.convert -q, group 64, from the HF folder (cached)."""
    if not (MLX_4BIT / "config.json").exists():
        log(f"making {MLX_4BIT} with mlx_lm.convert (4 bits, group 64)")
        from mlx_lm import convert

        convert(str(HF_MODEL), str(MLX_4BIT), quantize=True, q_group_size=64, q_bits=4, dtype="float32")
    return MLX_4BIT


def speed(base: dict, reps: int, slow_steps: int | None, log=print) -> dict:
    """forge-mlx vs mlx_lm LoRA, same data, batch, rank and layers. Two pairs: on the HF fp32 folder (forge-mlx
    stores the block linears as affine 4-bit g64 and forwards them through a dequantized copy; mlx_lm trains the
    fp32 model), and on mlx_lm's own 4-bit model (every linear and the tied embedding 4-bit), where forge-mlx runs
    with and without its dequantized copy. The 4-bit runs take ~1 min a step on MLX's CPU kernels, so they run
    `slow_steps` steps once; the fast pair runs `reps` rounds. None skips the 4-bit-model runs."""
    hf = {**base, "model": str(HF_MODEL)}
    rounds = [
        {
            "forge-mlx, HF fp32 -> 4-bit residual, copy on": ("forge_sft", {**hf, "cache": True}, None),
            "mlx_lm lora, HF fp32 model": ("mlx_lm", hf, bc.blas_env()),
        }
    ] * reps
    if slow_steps:
        q4 = {**base, "model": str(ensure_4bit_model(log))}
        rounds.append(
            {
                "forge-mlx, mlx_lm 4-bit model, copy on": (
                    "forge_sft",
                    {**q4, "cache": True, "steps": 2 * slow_steps},
                    None,
                ),
                "forge-mlx, mlx_lm 4-bit model, copy off": (
                    "forge_sft",
                    {**q4, "cache": False, "steps": slow_steps},
                    None,
                ),
                "mlx_lm lora, mlx_lm 4-bit model": ("mlx_lm", {**q4, "steps": slow_steps}, bc.blas_env()),
            }
        )
    runs: dict[str, list[dict]] = {}
    for index, candidates in enumerate(rounds):
        for name, (worker, spec, env) in candidates.items():
            result = call(worker, spec, env)
            runs.setdefault(name, []).append(
                {
                    **summarize(result["steps"]),
                    "peak_gb": result["peak_gb"],
                    "matmul_gflops": result["matmul_gflops"],
                    "step_log": result["steps"],
                }
            )
            s = runs[name][-1]
            log(
                f"  [{'4-bit run' if index == reps else f'round {index + 1}/{reps}'}] {name}: "
                f"{s['effective_tok_s']:.1f} effective tok/s, "
                f"{s['total_tok_s']:.1f} total tok/s, step {s['step_s']:.2f} s, peak {s['peak_gb']:.2f} GB"
            )
    return {
        name: {key: median([r[key] for r in rs]) for key in rs[0] if key != "step_log"} | {"runs": rs}
        for name, rs in runs.items()
    }


def matmul_params(config: dict) -> dict:
    """Weights that take part in a matmul per token: every linear of every block, plus the (tied) LM head."""
    h, i, n = config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]
    head_dim = config.get("head_dim") or h // config["num_attention_heads"]
    kv = config["num_key_value_heads"] * head_dim
    shapes = {
        "q_proj": h * h,
        "k_proj": h * kv,
        "v_proj": h * kv,
        "o_proj": h * h,
        "gate_proj": h * i,
        "up_proj": h * i,
        "down_proj": h * i,
    }
    return {
        "blocks": n * sum(shapes.values()),
        "lm_head": config["vocab_size"] * h,
    }


def utilisation(result: dict, grad_checkpoint: bool) -> dict:
    """Achieved FLOP/s over the measured fp32 matmul peak. FLOPs per position: forward 2N, backward 2N for the
    input gradients (frozen weights get no weight gradient; the adapters' own FLOPs are < 1 % at these ranks), plus
    2N to recompute the forward under gradient checkpointing; attention-score FLOPs (~2 % at T < 100) are left out."""
    config = json.loads((HF_MODEL / "config.json").read_text())
    params = matmul_params(config)
    n = params["blocks"] + params["lm_head"]
    per_position = (6 if grad_checkpoint else 4) * n
    gflops = per_position * result["positions_per_s"] / 1e9
    return {
        "matmul_params": n,
        "flops_per_position": per_position,
        "achieved_gflops": gflops,
        "peak_gflops": result["matmul_gflops"],
        "utilisation": gflops / result["matmul_gflops"],
    }


def quality(base: dict, lrs: list[float], steps: int, log=print) -> list[dict]:
    rows = []
    for lr in lrs:
        for init in ("pissa_niter_4", "lora"):
            result = call(
                "quality", {**base, "model": str(HF_MODEL), "residual": "none", "init": init, "lr": lr, "steps": steps}
            )
            rows.append({"init": init, "lr": lr, "steps": steps, **result})
            log(f"  {init} lr {lr}: val loss {' -> '.join(f'{v:.3f}' for _, v in result['val'])}")
    return rows


def dpo(base: dict, reps: int, steps: int) -> dict:
    spec = {**base, "model": str(HF_MODEL), "residual": "nf4", "cache": True, "steps": steps, "reps": reps, "pairs": 64}
    runs = call("dpo", spec)
    return {name: {key: median([r[key] for r in rs]) for key in rs[0]} | {"runs": rs} for name, rs in runs.items()}


def torch_section(base: dict, reps: int, log=print) -> dict | None:
    """forge-mlx's torch backend vs PEFT + transformers PiSSA on CPU, fp32, rounds of both; None if no backend."""
    import importlib.util

    if importlib.util.find_spec("forge_mlx.torch_backend.bench") is None:
        log("forge_mlx.torch_backend is not there yet: the torch comparison is skipped")
        return None
    spec = {**base, "model": str(HF_MODEL), "residual": "none", "init": "pissa_niter_4"}
    runs: dict[str, list[dict]] = {"forge-mlx torch backend": [], "PEFT + transformers": []}
    for rep in range(reps):
        forge = call("torch", spec)
        runs["forge-mlx torch backend"].append(
            {"effective_tok_s": forge["effective_tok_s"], "peak_rss_gb": forge["peak_gb"]}
        )
        peft = call("peft", {**spec, "steps": spec["steps"] + 2})
        timed_steps = peft["steps"][2:]  # as the torch backend's timer: two untimed warm-up steps
        tok_s = sum(s["real"] for s in timed_steps) / sum(s["seconds"] for s in timed_steps)
        runs["PEFT + transformers"].append({"effective_tok_s": tok_s, "peak_rss_gb": peft["peak_rss_gb"]})
        log(f"  [{rep + 1}/{reps}] torch backend {forge['effective_tok_s']:.0f} tok/s, PEFT {tok_s:.0f} tok/s")
    return {name: {key: median([r[key] for r in rs]) for key in rs[0]} | {"runs": rs} for name, rs in runs.items()}


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="one round, fewer steps, no runs on 4-bit kernels")
    p.add_argument("--reps", type=int, default=2, help="rounds of the timed runs (median reported)")
    p.add_argument("--steps", type=int, default=8, help="SFT steps per timed run of the fast pair")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--max-seq", type=int, default=256)
    p.add_argument("--targets", default="all-linear", help="all-linear (mlx_lm's default keys) or attention")
    p.add_argument("--grad-checkpoint", action="store_true", help="gradient checkpointing in every run")
    p.add_argument(
        "--slow-steps",
        type=int,
        default=2,
        help="steps of each run on MLX's 4-bit CPU kernels (~1 min each here; the first is left out of the timing)",
    )
    p.add_argument("--quality-steps", type=int, default=20)
    p.add_argument(
        "--quality-lrs",
        type=float,
        nargs="+",
        default=[2e-4, 1e-4, 2e-5],
        help="learning rates of the PiSSA vs LoRA runs (2e-5 is the PiSSA paper's)",
    )
    p.add_argument(
        "--backend",
        choices=["mlx", "torch"],
        default="mlx",
        help="torch: forge-mlx's torch backend vs PEFT + transformers instead of the MLX sections",
    )
    p.add_argument("--skip", nargs="*", default=[], choices=["speed", "quality", "dpo"])
    p.add_argument(
        "--threads",
        type=int,
        default=THREADS,
        help="BLAS/torch threads; 0 = library default (1 by default: steadier on a shared machine)",
    )
    p.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    p.add_argument("--spec", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def report_speed(results: dict, grad_checkpoint: bool) -> str:
    """One row per run; the ratio is against mlx_lm on the same model folder."""
    rows = []
    for name, r in results.items():
        anchor = results["mlx_lm lora, HF fp32 model" if "HF fp32" in name else "mlx_lm lora, mlx_lm 4-bit model"]
        u = utilisation(r, grad_checkpoint)
        r["utilisation"] = u
        rows.append(
            [
                name,
                len(r["runs"]),
                int(r["steps_timed"]),
                r["effective_tok_s"],
                r["total_tok_s"],
                r["padding"],
                r["step_s"],
                r["peak_gb"],
                ratio(r["effective_tok_s"], anchor["effective_tok_s"]),
                u["achieved_gflops"],
                f"{100 * u['utilisation']:.1f} %",
            ]
        )
    return table(
        [
            "run",
            "runs",
            "timed steps",
            "effective tok/s",
            "total tok/s",
            "padding",
            "step s",
            "peak GB",
            "eff. tok/s vs mlx_lm",
            "GFLOP/s",
            "of matmul peak",
        ],
        rows,
    )


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.worker:
        emit(WORKERS[args.worker](json.loads(args.spec)))
        return {}
    reps = 1 if args.quick else args.reps
    steps = 5 if args.quick else args.steps
    base = {
        "rank": args.rank,
        "batch": args.batch,
        "max_seq": args.max_seq,
        "targets": args.targets,
        "grad_checkpoint": args.grad_checkpoint,
        "lr": 2e-4,
        "steps": steps,
        "init": "pissa_niter_4",
        "residual": "affine",
    }
    info = machine()
    print(header("bench_train: SFT speed vs mlx_lm, PiSSA vs LoRA, utilisation, DPO cost", info))
    print(f"settings: {json.dumps(base)}")
    results: dict = {"machine": info, "settings": base, "reps": reps}
    tables = []
    if args.backend == "torch":
        torch_results = torch_section({**base, "steps": steps}, reps)
        results["torch"] = torch_results
        if torch_results:
            anchor = torch_results["PEFT + transformers"]["effective_tok_s"]
            tables.append(
                table(
                    ["run (torch, CPU, fp32)", "effective tok/s", "peak RSS GB", "tok/s vs PEFT"],
                    [
                        [n, r["effective_tok_s"], r["peak_rss_gb"], ratio(r["effective_tok_s"], anchor)]
                        for n, r in torch_results.items()
                    ],
                )
            )
    else:
        if "speed" not in args.skip:
            print("SFT speed (same 4-bit model, data, batch, rank, layers)")
            results["speed"] = speed(base, reps, None if args.quick else args.slow_steps)
            tables.append(report_speed(results["speed"], args.grad_checkpoint))
        if "quality" not in args.skip:
            print("PiSSA vs LoRA validation loss (forge-mlx, fp32 base)")
            q_steps = 8 if args.quick else args.quality_steps
            results["quality"] = quality(base, args.quality_lrs[:1] if args.quick else args.quality_lrs, q_steps)
            tables.append(
                table(
                    ["init", "lr", "steps", "val loss at 0", "halfway", "end", "mean train loss"],
                    [
                        [
                            r["init"],
                            r["lr"],
                            r["steps"],
                            r["val"][0][1],
                            r["val"][1][1],
                            r["val"][-1][1],
                            r["last_train_loss"],
                        ]
                        for r in results["quality"]
                    ],
                )
            )
        if "dpo" not in args.skip:
            print("DPO step vs SFT step (forge-mlx, NF4 residual)")
            results["dpo"] = dpo(base, reps, 4 if args.quick else 6)
            d = results["dpo"]
            rows_per_step = {"sft_chosen": args.batch, "dpo": 2 * args.batch, "sft_both": 2 * args.batch}
            tables.append(
                table(
                    ["phase", "rows/step", "step s", "effective tok/s", "peak GB", "step vs SFT chosen"],
                    [
                        [
                            name,
                            rows_per_step[name],
                            r["step_s"],
                            r["effective_tok_s"],
                            r["peak_gb"],
                            ratio(r["step_s"], d["sft_chosen"]["step_s"]),
                        ]
                        for name, r in d.items()
                    ],
                )
            )
    for text in tables:
        print("\n" + text)
    path = write_results("bench_train", results)
    print(f"\nresults: {path}")
    return results


if __name__ == "__main__":
    main()
