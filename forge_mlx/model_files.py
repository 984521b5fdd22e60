"""Find a Hugging Face model folder (local, or a hub id downloaded) and refuse what no backend will load:
pickled-only weights, custom remote code. Shared by the MLX and torch loaders; no array library here."""

from __future__ import annotations

import json
import re
from pathlib import Path

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
            raise ForgeError(
                "a model must be a folder in Hugging Face layout (config.json + *.safetensors)",
                where=str(path),
                hint="for a .gguf file run `forge-mlx import-gguf FILE OUT_DIR` first",
            )
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
            hint="check the id and the network; offline, use a local folder or a model already in the HF "
            "cache with HF_HUB_OFFLINE=1",
        ) from None


def read_json_object(file: Path, missing: str) -> dict:
    """A JSON file that must hold an object; errors name the file (and the line of a syntax error).
    `missing` says what the folder is not when the file is absent."""
    if not file.is_file():
        raise ForgeError(f"no {file.name}: {missing}", where=str(file.parent))
    try:
        value = json.loads(file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ForgeError(f"{file.name} is not valid JSON ({exc.msg})", where=f"{file}:{exc.lineno}") from None
    if not isinstance(value, dict):
        raise ForgeError(f"{file.name} must hold a JSON object", where=str(file))
    return value


def read_model_config(path: Path) -> dict:
    """config.json of a folder that holds safetensors weights and needs no custom code."""
    config_file = path / "config.json"
    config = read_json_object(config_file, "not a Hugging Face model folder")
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
    if not config.get("model_type"):
        raise ForgeError("config.json has no 'model_type'", where=str(config_file))
    return config
