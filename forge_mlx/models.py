"""Find and load a Hugging Face causal LM with mlx-lm: a local folder or a hub id; safetensors only, no remote code."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn

from forge_mlx.errors import ForgeError

HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")
# Only what a model needs: no pickles, no code.
HUB_PATTERNS = ["*.json", "model*.safetensors", "tokenizer.model", "*.tiktoken", "*.txt", "*.jinja"]
PICKLED = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl")


def is_hub_id(name: str) -> bool:
    return bool(HUB_ID.match(name)) and ".." not in name


def resolve_model_path(name: str) -> Path:
    """A local folder as it is, or a hub id downloaded (cached by huggingface_hub); clear errors otherwise."""
    path = Path(name).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ForgeError("a model must be a folder in Hugging Face layout (config.json + *.safetensors)",
                             where=str(path), hint="for a .gguf file run `forge-mlx import-gguf FILE OUT_DIR` first")
        return path
    if not is_hub_id(name):
        raise ForgeError("model folder not found, and it is not a hub id of the form owner/name", where=name)
    return _download(name)


def _download(repo: str) -> Path:
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo, allow_patterns=HUB_PATTERNS))
    except Exception as exc:  # the hub client raises many types: offline, 404, gated, auth
        kind = type(exc).__name__
        raise ForgeError(
            f"no local folder of that name, and the hub model '{repo}' could not be fetched ({kind})",
            where=repo,
            hint="check the id and the network; offline, use a local folder or a model already in the HF cache "
            "with HF_HUB_OFFLINE=1",
        ) from None


def check_model_folder(path: Path) -> dict:
    """Refuse what we will not load: missing config, pickled-only weights, custom code. Returns config.json."""
    config_file = path / "config.json"
    if not config_file.exists():
        raise ForgeError("no config.json: not a Hugging Face model folder", where=str(path))
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ForgeError(f"config.json is not valid JSON ({exc.msg})", where=f"{config_file}:{exc.lineno}") from None
    if not isinstance(config, dict):
        raise ForgeError("config.json must hold a JSON object", where=str(config_file))
    if not list(path.glob("model*.safetensors")):
        pickled = [p.name for pattern in PICKLED for p in path.glob(pattern)]
        if pickled:
            raise ForgeError(
                f"only pickled weights ({', '.join(sorted(pickled)[:3])}); forge-mlx never unpickles",
                where=str(path),
                hint="convert them to safetensors (e.g. transformers' save_pretrained(safe_serialization=True))",
            )
        raise ForgeError("no model*.safetensors weights", where=str(path))
    if config.get("model_file") or config.get("auto_map"):
        raise ForgeError("this model needs custom remote code, which forge-mlx never runs", where=str(config_file))
    model_type = config.get("model_type")
    if not model_type:
        raise ForgeError("config.json has no 'model_type'", where=str(config_file))
    try:
        from mlx_lm.utils import _get_classes

        _get_classes(config)
    except ValueError:
        raise ForgeError(
            f"architecture '{model_type}' is not supported by mlx-lm", where=f"{config_file}: field 'model_type'"
        ) from None
    return config


def on_gpu() -> bool:
    return mx.default_device() == mx.gpu


def compute_dtype(setting: str = "auto") -> mx.Dtype:
    """fp32 on CPU (bf16 matmul is not BLAS-backed there and runs far slower), bf16 on Metal/CUDA."""
    if setting == "auto":
        return mx.bfloat16 if on_gpu() else mx.float32
    return getattr(mx, setting)


def cast_floats(model: nn.Module, dtype: mx.Dtype) -> None:
    """Cast floating parameters (not packed quantized integers) to the compute dtype."""
    from mlx.utils import tree_map

    model.update(tree_map(lambda a: a.astype(dtype) if mx.issubdtype(a.dtype, mx.floating) else a,
                          model.parameters()))


def load_model(name: str, dtype: str = "auto"):
    """Load (model, tokenizer, config) through mlx-lm, weights cast to the compute dtype."""
    from mlx_lm.utils import load_model as mlx_load_model
    from mlx_lm.utils import load_tokenizer

    path = resolve_model_path(name)
    check_model_folder(path)
    try:  # mlx-lm reports a truncated file, a config/weights mismatch or a missing key in several types
        model, config = mlx_load_model(path, lazy=False)
    except (RuntimeError, ValueError, TypeError, KeyError) as exc:
        raise ForgeError(f"cannot load the model: {_one_line(exc)}", where=str(path),
                         hint="config.json and the *.safetensors must match and be complete; re-download "
                         "or re-convert the model") from exc
    cast_floats(model, compute_dtype(dtype))
    try:
        tokenizer = load_tokenizer(path, eos_token_ids=config.get("eos_token_id"))
    except (OSError, ValueError, TypeError, KeyError) as exc:
        raise ForgeError(f"cannot load the tokenizer: {_one_line(exc)}", where=str(path),
                         hint="the folder needs tokenizer.json (or tokenizer.model) and tokenizer_config.json"
                         ) from exc
    return model, tokenizer, config


def _one_line(exc: Exception, limit: int = 300) -> str:
    """A library's (often multi-line) message as one line, for the one-line CLI error."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def device_memory_bytes() -> int:
    """Memory the model can use: Metal's recommended working set on a Mac, else physical RAM."""
    info = mx.device_info()
    if "max_recommended_working_set_size" in info:
        return int(info["max_recommended_working_set_size"])
    if "memory_size" in info:
        return int(info["memory_size"])
    if sys.platform.startswith("linux"):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    return 0
