"""Training benchmarks: forge-mlx SFT speed and memory vs mlx_lm LoRA, PiSSA vs LoRA loss, utilisation, DPO cost.

Run: python tools/bench_train.py [--quick] [--backend torch]. Prints tables, writes bench_results/bench_train-*.json.
Every timed run is a fresh subprocess (its own peak memory), run in rounds (A B C A B C ...), medians reported.
Step time is the time between two batch requests of the training loop, so forge-mlx and mlx_lm are timed the same
way; the first step and any step on a batch shape not seen before (MLX recompiles the step) are left out.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

import bench_common as bc

THREADS = bc.pin_threads()  # thread count and OpenBLAS preload, before mlx or torch is imported

import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402
from bench_common import (  # noqa: E402
    ROOT,
    StepClock,
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

HF_MODEL = ROOT / "models" / "SmolLM2-135M-Instruct"
MLX_4BIT = ROOT / "bench_results" / "models" / "SmolLM2-135M-Instruct-4bit-g64"
SFT_DATA = ROOT / "data" / "sft"
DPO_DATA = ROOT / "data" / "dpo"
MODULE_PATHS = {
    "q_proj": "self_attn.q_proj",
    "k_proj": "self_attn.k_proj",
    "v_proj": "self_attn.v_proj",
    "o_proj": "self_attn.o_proj",
    "gate_proj": "mlp.gate_proj",
    "up_proj": "mlp.up_proj",
    "down_proj": "mlp.down_proj",
}


# ---------------------------------------------------------------------------------------------------- workers
# Each runs in its own process (python tools/bench_train.py --worker NAME --spec JSON) and emits one JSON result.


def forge_config(spec: dict, run_dir: str):
    from forge_mlx.config import load_config

    sets = [
        f"model={spec['model']}",
        f"output_dir={run_dir}",
        "dtype=float32",
        f"adapter.init={spec['init']}",
        f"adapter.rank={spec['rank']}",
        f"adapter.alpha={2.0 * spec['rank']}",
        f"adapter.targets={spec['targets']}",
        f"adapter.residual={spec['residual']}",
        f"adapter.cpu_dequant_cache={str(spec.get('cache', True)).lower()}",
        f"data.train={SFT_DATA}",
        f"data.max_seq_length={spec['max_seq']}",
        f"train.batch_size={spec['batch']}",
        "train.grad_accum=1",
        f"train.grad_checkpoint={str(spec.get('grad_checkpoint', False)).lower()}",
        f"train.lr={spec['lr']}",
        f"train.warmup_steps={spec.get('warmup', 2)}",
    ]
    return load_config(None, sets)


def forge_model(spec: dict, run_dir: str):
    """(model, tokenizer, config) with adapters applied as `forge-mlx train` does."""
    from forge_mlx.models import load_model
    from forge_mlx.pipeline import adapt

    config = forge_config(spec, run_dir)
    mx.random.seed(config.seed)
    model, tokenizer, _ = load_model(config.model, config.dtype)
    adapt(model, config, log=lambda *_: None)
    return model, tokenizer, config


def forge_train(
    model, loss_fn, batches, steps: int, lr: float, run_dir: str, val=None, steps_per_eval=None, warmup: int = 2
):
    """forge-mlx's train_loop for `steps` steps on `batches` ((arrays, real tokens) pairs); returns its result."""
    from forge_mlx.adapters import adapter_weights
    from forge_mlx.pipeline import make_optimizer
    from forge_mlx.train import LoopSpec, train_loop

    optimizer = make_optimizer(lr, steps, warmup, 0.1, 0.0)
    spec = LoopSpec("sft", steps, 1, 1.0, steps, steps_per_eval or 10**9, 10**9, 5, 8 if val else 0)
    return train_loop(
        model,
        optimizer,
        loss_fn,
        batches,
        spec,
        Path(run_dir),
        adapter_weights=lambda: adapter_weights(model),
        data_state=dict,
        val_batches=val,
    )


def forge_shape(item) -> tuple[int, int, int]:
    arrays, real = item
    rows, length = arrays[0].shape
    return rows, length, real


def sft_stream(examples: list, tokenizer, batch: int, max_seq: int, seed: int = 0):
    from forge_mlx.data.batching import BatchStream
    from forge_mlx.pipeline import sft_arrays

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    stream = BatchStream(examples, batch, seed=seed, max_seq_length=max_seq, pad_id=pad)
    return (sft_arrays(b) for b in stream)


def sft_examples(tokenizer, split: str, max_seq: int) -> list:
    from forge_mlx.data.jsonl import load_split
    from forge_mlx.data.sft import encode_sft_split

    return encode_sft_split(load_split(str(SFT_DATA), split, kind="sft"), tokenizer, max_seq_length=max_seq).examples


def worker_forge_sft(spec: dict) -> dict:
    """SFT steps of forge-mlx's loop on the sample data; peak memory is the training's (reset after init)."""
    from forge_mlx.doctor import matmul_gflops
    from forge_mlx.pipeline import sft_loss_fn

    with tempfile.TemporaryDirectory() as run_dir:
        model, tokenizer, config = forge_model(spec, run_dir)
        clock = StepClock(
            sft_stream(sft_examples(tokenizer, "train", spec["max_seq"]), tokenizer, spec["batch"], spec["max_seq"]),
            forge_shape,
        )
        mx.reset_peak_memory()
        forge_train(model, sft_loss_fn(None), clock, spec["steps"], spec["lr"], run_dir)
        clock.finish()
        peak = mx.get_peak_memory()
    return {"steps": clock.steps(), "peak_gb": peak / 2**30, "matmul_gflops": matmul_gflops()}


def worker_mlx_lm(spec: dict) -> dict:
    """mlx_lm's own LoRA trainer (mlx_lm.tuner.trainer.train) on its own 4-bit model and chat dataset."""
    from types import SimpleNamespace

    import mlx.optimizers as optim
    from mlx_lm import load
    from mlx_lm.tuner.datasets import CacheDataset, create_dataset
    from mlx_lm.tuner.trainer import TrainingArgs, iterate_batches, train
    from mlx_lm.tuner.utils import linear_to_lora_layers

    from forge_mlx.doctor import matmul_gflops

    mx.random.seed(0)
    np.random.seed(0)
    model, tokenizer = load(spec["model"])
    model.freeze()
    names = [MODULE_PATHS[n] for n in target_names(spec["targets"])]
    lora = {"rank": spec["rank"], "scale": 2.0, "dropout": 0.0, "keys": names}
    linear_to_lora_layers(model, len(model.layers), lora)
    rows = [json.loads(line) for line in (SFT_DATA / "train.jsonl").read_text().splitlines() if line.strip()]
    dataset = CacheDataset(create_dataset(rows, tokenizer, SimpleNamespace(mask_prompt=True)))
    clocks = []

    def clocked(**kwargs):
        clocks.append(StepClock(iterate_batches(**kwargs), lambda b: (*b[0].shape, int(b[1][:, 1].sum()))))
        return clocks[-1]

    with tempfile.TemporaryDirectory() as out:
        args = TrainingArgs(
            batch_size=spec["batch"],
            iters=spec["steps"],
            val_batches=0,
            steps_per_report=spec["steps"],
            steps_per_eval=10**9,
            steps_per_save=10**9,
            adapter_file=str(Path(out) / "adapters.safetensors"),
            max_seq_length=spec["max_seq"],
            grad_checkpoint=spec.get("grad_checkpoint", False),
        )
        mx.reset_peak_memory()
        train(model, optim.AdamW(learning_rate=spec["lr"]), dataset, None, args, iterate_batches=clocked)
        clocks[0].finish()
        peak = mx.get_peak_memory()
    return {"steps": clocks[0].steps(), "peak_gb": peak / 2**30, "matmul_gflops": matmul_gflops()}


def target_names(targets: str) -> list[str]:
    from forge_mlx.adapters import TARGET_PRESETS

    return list(TARGET_PRESETS.get(targets, targets.split(",")))


def worker_quality(spec: dict) -> dict:
    """Validation loss of forge-mlx SFT from one init: before training, halfway and at the end."""
    from forge_mlx.data.batching import eval_batches
    from forge_mlx.pipeline import sft_arrays, sft_loss_fn
    from forge_mlx.train import evaluate_loss

    with tempfile.TemporaryDirectory() as run_dir:
        model, tokenizer, _ = forge_model(spec, run_dir)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        valid = [
            sft_arrays(b)[0]
            for b in eval_batches(sft_examples(tokenizer, "valid", spec["max_seq"]), spec["batch"], pad_id=pad)
        ]
        loss_fn = sft_loss_fn(None)
        start = evaluate_loss(model, loss_fn, valid)[0]
        stream = sft_stream(
            sft_examples(tokenizer, "train", spec["max_seq"]), tokenizer, spec["batch"], spec["max_seq"]
        )
        result = forge_train(
            model,
            loss_fn,
            stream,
            spec["steps"],
            spec["lr"],
            run_dir,
            val=lambda: valid,
            steps_per_eval=max(spec["steps"] // 2, 1),
        )
    val = [(r["step"], r["val_loss"]) for r in result.history if "val_loss" in r]
    train_losses = [r["loss"] for r in result.history if "loss" in r]
    return {"val": [(0, start), *val], "last_train_loss": train_losses[-1] if train_losses else None}


def worker_dpo(spec: dict) -> dict:
    """Step time and peak memory of a DPO step (b pairs: policy on chosen + rejected, reference log-probs
    precomputed, one model) vs SFT steps on the same sequences: the b chosen rows, and all 2b rows."""
    from forge_mlx.config import load_config
    from forge_mlx.data.batching import BatchStream
    from forge_mlx.data.jsonl import load_split
    from forge_mlx.data.preference import encode_preference_split
    from forge_mlx.dpo import dpo_loss_fn, preference_arrays, reference_logps
    from forge_mlx.pipeline import sft_loss_fn

    with tempfile.TemporaryDirectory() as run_dir:
        model, tokenizer, _ = forge_model(spec, run_dir)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        pairs = encode_preference_split(
            load_split(str(DPO_DATA), "train", kind="preference"), tokenizer, max_seq_length=spec["max_seq"]
        ).examples[: spec["pairs"]]
        b = spec["batch"]
        reference = reference_logps(model, pairs, b, False, pad)
        dpo_config = load_config(None, [f"dpo.data={DPO_DATA}", "dpo.enabled=true"])
        chosen = [tuple(p.chosen) for p in pairs]
        both = chosen + [tuple(p.rejected) for p in pairs]
        phases = {
            "sft_chosen": (sft_loss_fn(None), lambda: sft_stream(chosen, tokenizer, b, spec["max_seq"])),
            "dpo": (
                dpo_loss_fn(dpo_config),
                lambda: (preference_arrays(x, reference) for x in BatchStream(pairs, b, seed=0, pad_id=pad)),
            ),
            "sft_both": (sft_loss_fn(None), lambda: sft_stream(both, tokenizer, 2 * b, spec["max_seq"])),
        }
        out = {name: [] for name in phases}
        for _ in range(spec["reps"]):
            for name, (loss_fn, make_batches) in phases.items():
                clock = StepClock(make_batches(), forge_shape)
                mx.reset_peak_memory()
                forge_train(model, loss_fn, clock, spec["steps"], 1e-5, run_dir)
                clock.finish()
                out[name].append({**summarize(clock.steps()), "peak_gb": mx.get_peak_memory() / 2**30})
    return out


def worker_torch(spec: dict) -> dict:
    """forge-mlx's torch backend (forge_mlx.torch_backend.bench.time_training_steps) on the same settings."""
    from forge_mlx.torch_backend.bench import time_training_steps

    bc.torch_threads(THREADS)
    with tempfile.TemporaryDirectory() as run_dir:
        config = forge_config(spec, run_dir)
        result = time_training_steps(config, steps=spec["steps"], warmup=2, device="cpu", log=lambda *_: None)
    return {
        "effective_tok_s": result["tokens_per_s"],
        "seconds": result["seconds"],
        "steps": result["steps"],
        "peak_gb": result["peak_memory_gb"],
        "dtype": result["dtype"],
    }


def worker_peft(spec: dict) -> dict:
    """The anchor: transformers LlamaForCausalLM + PEFT PiSSA (pissa_niter_4) + torch AdamW, plain loop, fp32,
    on forge-mlx's batches of the same data (same rows and padding), masked labels."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoTokenizer, LlamaForCausalLM

    from forge_mlx.data.batching import BatchStream

    bc.torch_threads(THREADS)
    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(HF_MODEL)
    model = LlamaForCausalLM.from_pretrained(HF_MODEL, dtype=torch.float32)
    config = LoraConfig(
        r=spec["rank"],
        lora_alpha=2 * spec["rank"],
        target_modules=target_names(spec["targets"]),
        init_lora_weights="pissa_niter_4",
    )
    model = get_peft_model(model, config)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=spec["lr"], weight_decay=0.0)
    examples = sft_examples(tokenizer, "train", spec["max_seq"])
    stream = BatchStream(
        examples, spec["batch"], seed=0, max_seq_length=spec["max_seq"], pad_id=tokenizer.pad_token_id or 0
    )
    model.train()
    marks, shapes = [], []
    for _ in range(spec["steps"]):
        marks.append(time.perf_counter())
        batch = next(stream)
        rows = [i for i, ids in enumerate(batch.example_ids) if ids]  # drop the filler rows
        tokens = torch.from_numpy(batch.tokens[rows]).long()
        labels = tokens.masked_fill(~torch.from_numpy(batch.loss_mask[rows]), -100)
        shapes.append((*tokens.shape, int(batch.lengths[rows].sum())))
        loss = model(input_ids=tokens, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    clock = StepClock(iter(()), None)
    clock.marks, clock.shapes = [*marks, time.perf_counter()], shapes
    return {"steps": clock.steps(), "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


WORKERS = {
    "forge_sft": worker_forge_sft,
    "mlx_lm": worker_mlx_lm,
    "quality": worker_quality,
    "dpo": worker_dpo,
    "torch": worker_torch,
    "peft": worker_peft,
}


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
