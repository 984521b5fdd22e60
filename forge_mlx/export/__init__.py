"""`forge-mlx export`: from a run directory alone, write a merged Hugging Face model, a PEFT LoRA adapter or
an mlx-lm adapter (with a model card), then optionally push it to the Hub.

The folder is written beside OUT and renamed into place at the end: a failed export leaves nothing half-done.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import mlx.core as mx

from forge_mlx.errors import ForgeError
from forge_mlx.export.card import final_metrics, model_card
from forge_mlx.export.convert import conversion_error, describe_error, lora_factors, sample_inputs
from forge_mlx.export.hf import EXPORT_DTYPES, base_dtype, export_hf, parse_size
from forge_mlx.export.hub import push_to_hub
from forge_mlx.export.mlx_lm import export_mlx_lm
from forge_mlx.export.peft import export_peft
from forge_mlx.model_files import is_hub_id, resolve_model_path
from forge_mlx.run_files import INIT_ADAPTERS
from forge_mlx.runs import adapter_meta, load_run, run_config, trained_adapters_file

FORMATS = ("hf", "peft", "mlx-lm")
CARD = "README.md"


def check_out_dir(out: Path, force: bool, keep: list[Path]) -> None:
    """Refuse a non-empty OUT unless --force; never replace a folder holding the run, the base or the cwd."""
    if out.exists() and not out.is_dir():
        raise ForgeError("the output path is a file", where=str(out), hint="give a folder for --out")
    if not out.exists() or not any(out.iterdir()):
        return
    if not force:
        raise ForgeError(
            "the output folder exists and is not empty",
            where=str(out),
            hint="pass --force to replace it, or choose a new folder",
        )
    resolved = out.resolve()
    for path in keep:
        if path.resolve() == resolved or path.resolve().is_relative_to(resolved):
            raise ForgeError(
                f"refusing to replace a folder that holds {path}", where=str(out), hint="choose another --out"
            )


def _base_name(model: str, base_dir: Path) -> str:
    """How adapter configs name the base: the hub id, or the local folder's absolute path."""
    return model if is_hub_id(model) and not Path(model).exists() else str(base_dir.resolve())


def _write(run_dir: Path, fmt: str, staging: Path, dtype: str | None, shard_bytes: int, log) -> dict:
    """Write the format's files into `staging`; returns what the card and the caller need."""
    model, tokenizer, config, meta = load_run(run_dir, log=log)
    base_dir = resolve_model_path(config.model)
    done = {"base": _base_name(config.model, base_dir), "config": config, "meta": meta, "error": None}
    if fmt == "hf":
        done["dtype"] = dtype or base_dtype(base_dir)
        done["files"] = export_hf(model, base_dir, staging, done["dtype"], shard_bytes, log)
        return done
    done["dtype"] = dtype or "float32"
    init_file = run_dir / INIT_ADAPTERS
    if meta.get("init") != "lora" and not init_file.exists():
        raise ForgeError(
            f"the run has no {INIT_ADAPTERS}, needed to convert PiSSA to LoRA",
            where=str(run_dir),
            hint="export --format hf instead",
        )
    init_weights = mx.load(str(init_file)) if init_file.exists() else {}
    factors = lora_factors(model, init_weights, meta.get("init", "pissa"))
    if fmt == "peft":
        done["files"] = export_peft(factors, done["base"], staging, done["dtype"])
    else:
        done["files"] = export_mlx_lm(factors, len(model.layers), done["base"], staging, done["dtype"])
    from mlx_lm.utils import load_model as mlx_load_model

    base, _ = mlx_load_model(base_dir, lazy=True)  # read layer by layer as the comparison needs it
    done["error"] = conversion_error(model, base, factors, sample_inputs(tokenizer))
    log("LoRA on the original base vs the trained model:")
    for line in describe_error(done["error"]):
        log(f"  {line}")
    if meta.get("residual", "none") != "none":
        log("  (--format hf writes the trained model itself, 4-bit rounding included)")
    return done


def export_run(
    run_dir: str | Path,
    fmt: str,
    out: str | Path,
    *,
    dtype: str | None = None,
    shard_size: str = "5GB",
    force: bool = False,
    push_to_hub_repo: str | None = None,
    dry_run: bool = False,
    log=print,
) -> dict:
    """Export the run in `fmt` into `out`; returns {out, files, dtype, conversion_error, uploaded}.

    dtype defaults to the base's for hf and float32 for adapters; conversion_error is None for hf.
    """
    run_dir, out = Path(run_dir), Path(out)
    if fmt not in FORMATS:
        raise ForgeError(f"unknown export format '{fmt}'", where="--format", hint=f"use one of {', '.join(FORMATS)}")
    if dtype is not None and dtype not in EXPORT_DTYPES:
        raise ForgeError(f"unknown dtype '{dtype}'", where="--dtype", hint=f"use one of {', '.join(EXPORT_DTYPES)}")
    if dry_run and not push_to_hub_repo:
        raise ForgeError("--dry-run previews a push", where="--dry-run", hint="give --push-to-hub REPO as well")
    shard_bytes = parse_size(shard_size)
    config = run_config(run_dir)
    if fmt != "hf" and config.adapter.import_adapter:
        raise ForgeError(
            f"this run merged the adapter {config.adapter.import_adapter} into its base before PiSSA init, so a "
            f"{fmt} adapter would not reproduce it on the original base",
            where=str(run_dir),
            hint="export with --format hf (merged weights)",
        )
    adapter_meta(run_dir)
    trained_adapters_file(run_dir)  # fail before loading anything
    check_out_dir(out, force, [run_dir, Path(config.model), Path.cwd(), Path.home()])
    staging = out.resolve().parent / f".{out.resolve().name}.partial-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        log(f"exporting {run_dir} as {fmt}")
        done = _write(run_dir, fmt, staging, dtype, shard_bytes, log)
        conversion = describe_error(done["error"]) if done["error"] else None
        card = model_card(
            fmt, done["meta"], done["config"], done["base"], final_metrics(run_dir), done["dtype"], conversion
        )
        (staging / CARD).write_text(card, encoding="utf-8")
        if out.exists():
            shutil.rmtree(out)
        staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    files = [*done["files"], CARD]
    log(f"exported to {out}: {', '.join(files)}")
    uploaded = push_to_hub(out, push_to_hub_repo, dry_run=dry_run, log=log) if push_to_hub_repo else None
    return {
        "out": out,
        "files": files,
        "dtype": done["dtype"],
        "conversion_error": done["error"],
        "uploaded": uploaded,
    }
