"""The worker processes of tools/bench_train.py: each runs one training job in its own process and emits one
JSON result (`python tools/bench_train.py --worker NAME --spec JSON`). Imported by bench_train.py after
bench_common.pin_threads(), which must run before mlx or torch is imported."""

from __future__ import annotations

import json
import os
import resource
import tempfile
import time
from pathlib import Path

import bench_common as bc
import mlx.core as mx
import numpy as np
from bench_common import ROOT, StepClock, summarize

# set by bench_common.pin_threads from --threads (unset: library defaults, as 0 means there)
THREADS = int(os.environ.get(bc.THREAD_VARS[0], "0"))
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
