"""Typed run configuration: YAML into dataclasses, `--set section.key=value` overrides, strict keys.

Every default is the design notes' (rank 64, alpha 128, lr 2e-4, accumulation 4, q/k/v/o, NF4 blocks of 64 with double
quantization, checkpointing on, memory alert at 80 %, DPO beta 0.1 / lr 5e-5 / sigmoid). Unknown keys are errors that
suggest the nearest valid key (mlx-lm silently accepts them, which hides typos).
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import yaml

from forge_mlx.errors import ForgeError


def _opt(default: Any, help: str, **checks: Any) -> Any:
    """A dataclass field with help text and optional checks (choices, min, min_exclusive, max)."""
    factory = {"default_factory": default} if callable(default) else {"default": default}
    return field(metadata={"help": help, **checks}, **factory)


@dataclass
class AdapterConfig:
    init: str = _opt("pissa", "pissa (full SVD), pissa_niter_N (randomized, N power iterations) or lora")
    oversample: int = _opt(10, "extra sketch columns of the randomized SVD (pissa_niter_N); 0 = PEFT's", min=0)
    rank: int = _opt(64, "adapter rank r", min=1)
    alpha: float = _opt(
        128.0,
        "scaling = alpha / rank (PiSSA divides it out, so init is exact for any alpha)",
        min_exclusive=0,
    )
    dropout: float = _opt(0.0, "dropout on the adapter input", min=0, max=1)
    targets: str | list[str] = _opt(
        "attention", "attention (q/k/v/o), all-linear, or a list of module names such as [q_proj, v_proj]"
    )
    rank_pattern: dict[str, int] = _opt(dict, "per-layer rank overrides: {'layers.0.self_attn.q_proj': 16}")
    residual: str = _opt("nf4", "storage of the frozen residual", choices=("none", "affine", "nf4"))
    bits: int = _opt(4, "affine residual bits", choices=(4, 8))
    group_size: int = _opt(64, "affine residual group size", choices=(32, 64, 128))
    blocksize: int = _opt(64, "NF4 block size (bitsandbytes: 64)", min=16)
    double_quant: bool = _opt(True, "NF4 double quantization of the absmax (8-bit, blocks of 256)")
    qpissa_iters: int = _opt(1, "QPiSSA alternations of SVD and quantization (paper, appendix E)", min=1)
    cpu_dequant_cache: bool = _opt(
        True,
        "on a CPU device, forward 4-bit layers through a dequantized copy (BLAS speed, full-precision memory)",
    )
    import_adapter: str | None = _opt(
        None,
        "a PEFT or mlx-lm LoRA adapter folder merged into the base weights (W + delta) before the PiSSA init",
    )


@dataclass
class DataConfig:
    train: str | None = _opt(None, "JSONL file, or a folder with train/valid/test.jsonl")
    valid: str | None = _opt(None, "held-out JSONL (default: valid.jsonl beside train, when present)")
    mask_prompt: bool = _opt(True, "loss on completion tokens only")
    supervise: str = _opt(
        "all_assistant", "which assistant turns carry loss", choices=("all_assistant", "last_assistant")
    )
    max_seq_length: int = _opt(2048, "longer sequences are truncated or dropped", min=8)
    overlong: str = _opt("truncate", "what to do with over-long sequences", choices=("truncate", "drop"))
    skip_bad_rows: bool = _opt(False, "skip and count invalid preference rows instead of failing")


@dataclass
class TrainConfig:
    steps: int | None = _opt(None, "optimizer steps (set steps or epochs; default 1 epoch)", min=1)
    epochs: float | None = _opt(None, "passes over the training data", min_exclusive=0)
    batch_size: int = _opt(4, "sequences per micro-batch", min=1)
    grad_accum: int = _opt(4, "micro-batches per optimizer step", min=1)
    lr: float = _opt(2e-4, "peak learning rate", min_exclusive=0)
    warmup_steps: int = _opt(10, "linear warmup steps", min=0)
    min_lr_ratio: float = _opt(0.1, "cosine floor as a fraction of lr", min=0, max=1)
    weight_decay: float = _opt(0.0, "AdamW weight decay", min=0)
    max_grad_norm: float = _opt(1.0, "gradient clipping by global norm (0 disables)", min=0)
    grad_checkpoint: bool = _opt(True, "recompute each transformer block in the backward pass")
    loss_chunk_size: int | None = _opt(None, "compute the loss over the vocabulary in sequence chunks", min=1)
    steps_per_report: int = _opt(10, "steps between progress records", min=1)
    steps_per_eval: int = _opt(50, "steps between validation passes", min=1)
    val_batches: int = _opt(8, "batches per validation pass (0 disables validation)", min=0)
    save_every: int = _opt(50, "steps between checkpoints", min=1)
    max_bad_steps: int = _opt(5, "stop after this many skipped steps in a row (non-finite loss or gradients)", min=1)
    report_to: str = _opt("none", "also send each metrics record to Weights & Biases", choices=("none", "wandb"))
    wandb_project: str = _opt("forge-mlx", "W&B project (the run is named after output_dir)")


@dataclass
class DPOConfig:
    enabled: bool = _opt(False, "run DPO after SFT in the same `forge-mlx train`")
    data: str | None = _opt(None, "preference JSONL, or a folder with train/valid.jsonl")
    beta: float = _opt(0.1, "DPO temperature", min_exclusive=0)
    loss: str = _opt("sigmoid", "DPO loss", choices=("sigmoid", "ipo", "hinge", "robust"))
    label_smoothing: float = _opt(0.0, "robust / conservative DPO label noise", min=0, max=0.49)
    lr: float = _opt(5e-5, "peak learning rate", min_exclusive=0)
    steps: int | None = _opt(None, "optimizer steps (default 1 epoch)", min=1)
    epochs: float | None = _opt(None, "passes over the preference data", min_exclusive=0)
    batch_size: int = _opt(2, "preference pairs per micro-batch", min=1)
    grad_accum: int = _opt(4, "micro-batches per optimizer step", min=1)
    warmup_steps: int = _opt(5, "linear warmup steps", min=0)


@dataclass
class MemoryConfig:
    alert_threshold: float = _opt(
        0.80, "warn when peak memory passes this fraction of device memory", min_exclusive=0, max=1
    )
    wired_limit: bool = _opt(True, "on macOS, wire the model's memory (mx.set_wired_limit)")
    cache_limit_gb: float | None = _opt(None, "MLX buffer-cache cap so memory does not creep", min=0)


@dataclass
class Config:
    model: str = _opt("models/SmolLM2-135M-Instruct", "hub id or local folder (HF layout, safetensors)")
    output_dir: str = _opt("runs/default", "run directory: config, metrics, checkpoints, adapters")
    backend: str = _opt("auto", "auto (MLX where it works, else torch), mlx or torch", choices=("auto", "mlx", "torch"))
    dtype: str = _opt(
        "auto",
        "compute dtype; auto = float32 on CPU, bfloat16 on GPU",
        choices=("auto", "float32", "bfloat16", "float16"),
    )
    seed: int = _opt(0, "seed for init, shuffling and dropout")
    adapter: AdapterConfig = _opt(AdapterConfig, "adapter and residual")
    data: DataConfig = _opt(DataConfig, "SFT data")
    train: TrainConfig = _opt(TrainConfig, "SFT optimisation")
    dpo: DPOConfig = _opt(DPOConfig, "DPO phase")
    memory: MemoryConfig = _opt(MemoryConfig, "memory guard")


def _is_section(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _type_name(tp: Any) -> str:
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in args)
    if tp is type(None):
        return "null"
    if typing.get_origin(tp) is list:
        return f"a list of {_type_name(args[0])}"
    if typing.get_origin(tp) is dict:
        return f"a mapping of {_type_name(args[0])} to {_type_name(args[1])}"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any) -> Any:
    """Return value as type tp, or raise TypeError. Ints are accepted for floats; bools never for numbers."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (Union, types.UnionType):
        for arg in args:
            try:
                return _coerce(value, arg)
            except TypeError:
                continue
        raise TypeError
    if tp is type(None):
        if value is None:
            return None
        raise TypeError
    if origin is list:
        if not isinstance(value, list):
            raise TypeError
        return [_coerce(v, args[0]) for v in value]
    if origin is dict:
        if not isinstance(value, dict):
            raise TypeError
        return {_coerce(k, args[0]): _coerce(v, args[1]) for k, v in value.items()}
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):
        try:
            return float(value)  # YAML 1.1 reads "2e-4" as a string
        except ValueError:
            raise TypeError from None
    if tp in (int, str, bool) and type(value) is tp:
        return value
    raise TypeError


def _check_range(value: Any, meta: dict, key: str, where: str) -> None:
    if value is None:
        return
    if "choices" in meta and value not in meta["choices"]:
        raise ForgeError(f"'{key}' is {value!r}; expected one of {list(meta['choices'])}", where=where)
    numbers = value if isinstance(value, list) else [value]
    for number in numbers:
        if not isinstance(number, (int, float)):
            continue
        if "min" in meta and number < meta["min"]:
            raise ForgeError(f"'{key}' is {number}; expected >= {meta['min']}", where=where)
        if "min_exclusive" in meta and number <= meta["min_exclusive"]:
            raise ForgeError(f"'{key}' is {number}; expected > {meta['min_exclusive']}", where=where)
        if "max" in meta and number > meta["max"]:
            raise ForgeError(f"'{key}' is {number}; expected <= {meta['max']}", where=where)


def _build(cls: type, values: dict, prefix: str, places: dict[str, str], source: str) -> Any:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in values.items():
        dotted = f"{prefix}{key}"
        # an override of a sub-key (`--set model.x=1`) locates an error on its parent key too
        where = places.get(dotted) or next((w for k, w in places.items() if k.startswith(f"{dotted}.")), source)
        if key not in fields:
            nearest = difflib.get_close_matches(str(key), list(fields), n=1)
            hint = f"did you mean '{prefix}{nearest[0]}'?" if nearest else f"valid keys: {', '.join(fields)}"
            raise ForgeError(f"unknown key '{dotted}'", where=where, hint=hint)
        tp = hints[key]
        if _is_section(tp):
            if not isinstance(value, dict):
                raise ForgeError(f"'{dotted}' must be a section (a mapping of keys)", where=where)
            kwargs[key] = _build(tp, value, f"{dotted}.", places, source)
            continue
        try:
            coerced = _coerce(value, tp)
        except TypeError:
            raise ForgeError(
                f"'{dotted}' is {value!r} ({type(value).__name__}); expected {_type_name(tp)}", where=where
            ) from None
        _check_range(coerced, fields[key].metadata, dotted, where)
        kwargs[key] = coerced
    return cls(**kwargs)


def _yaml_with_lines(text: str, source: str) -> tuple[dict, dict[str, int]]:
    """Parse YAML keeping the 1-based line of every dotted key, so errors can point at it."""
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark, context = getattr(exc, "problem_mark", None), getattr(exc, "context_mark", None)
        where = f"{source}:{mark.line + 1}" if mark else source
        opened = f" ({exc.context} at line {context.line + 1})" if context and exc.context else ""
        raise ForgeError(f"invalid YAML: {getattr(exc, 'problem', exc)}{opened}", where=where) from None
    if data is None:
        return {}, {}
    if not isinstance(data, dict):
        raise ForgeError("a config file must be a mapping of sections and keys", where=source)
    lines: dict[str, int] = {}

    def walk(mapping: yaml.MappingNode, prefix: str) -> None:
        for key_node, value_node in mapping.value:
            dotted = f"{prefix}{key_node.value}"
            if dotted in lines:  # YAML keeps the last silently, which would drop the first section whole
                raise ForgeError(
                    f"duplicate key '{dotted}' (first on line {lines[dotted]})",
                    where=f"{source}:{key_node.start_mark.line + 1}",
                )
            lines[dotted] = key_node.start_mark.line + 1
            if isinstance(value_node, yaml.MappingNode):
                walk(value_node, f"{dotted}.")

    walk(node, "")
    return data, lines


def parse_override(text: str) -> tuple[list[str], Any]:
    """'train.lr=1e-4' -> (['train', 'lr'], 1e-4); the value is read as YAML."""
    if "=" not in text:
        raise ForgeError(f"override '{text}' is not of the form section.key=value", where="--set")
    key, raw = text.split("=", 1)
    value = yaml.safe_load(raw) if raw.strip() else None
    return key.strip().split("."), value


def _apply_override(data: dict, path: list[str], value: Any) -> None:
    node = data
    for part in path[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ForgeError(f"'{'.'.join(path)}': '{part}' is not a section", where="--set")
    node[path[-1]] = value


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> Config:
    """Read a YAML config (or the defaults when path is None) and apply `--set` overrides, validating all."""
    data: dict = {}
    lines: dict[str, int] = {}
    source = "defaults"  # where errors point when there is no file
    if path is not None:
        source = str(path)
        try:
            text = Path(path).read_text(encoding="utf-8")
        except FileNotFoundError:
            raise ForgeError("config file not found", where=source) from None
        except UnicodeDecodeError as exc:
            raise ForgeError(f"config is not UTF-8 (byte {exc.start})", where=source) from None
        data, lines = _yaml_with_lines(text, source)
    places = {key: f"{source}:{line}" for key, line in lines.items()}
    for text in overrides:
        key_path, value = parse_override(text)
        _apply_override(data, key_path, value)
        places[".".join(key_path)] = f"--set {text}"
    config = _build(Config, data, "", places, source)
    return _check_consistency(config, source)


def _check_consistency(config: Config, source: str) -> Config:
    if config.train.steps is not None and config.train.epochs is not None:
        raise ForgeError("set train.steps or train.epochs, not both", where=source)
    if config.dpo.steps is not None and config.dpo.epochs is not None:
        raise ForgeError("set dpo.steps or dpo.epochs, not both", where=source)
    init = config.adapter.init
    if init not in ("pissa", "lora") and not (init.startswith("pissa_niter_") and init[12:].isdigit()):
        raise ForgeError(
            f"'adapter.init' is {init!r}; expected pissa, pissa_niter_N (e.g. pissa_niter_4) or lora",
            where=source,
        )
    if config.dpo.enabled and not config.dpo.data:
        raise ForgeError("'dpo.enabled' is true but 'dpo.data' is not set", where=source)
    return config


def to_dict(config: Config) -> dict:
    return dataclasses.asdict(config)


def save_config(config: Config, path: str | Path) -> None:
    """Write the resolved config (every key, defaults included) so a run directory is self-describing.

    Written through a temporary name: a full disk leaves no torn config.yaml (the OSError goes to the caller).
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_text(yaml.safe_dump(to_dict(config), sort_keys=False), encoding="utf-8")
        tmp.replace(path)
    except OSError:
        tmp.unlink(missing_ok=True)
        raise


def reference(cls: type = Config, prefix: str = "") -> list[tuple[str, str, str]]:
    """(key, default, help) for every key: the README's config reference is generated from this."""
    rows = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if _is_section(hints[f.name]):
            rows += reference(hints[f.name], f"{prefix}{f.name}.")
        else:
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            rows.append((f"{prefix}{f.name}", repr(default), f.metadata.get("help", "")))
    return rows
