"""Push an export folder to the Hugging Face Hub, or list what would be pushed (--dry-run).

The token comes from HF_TOKEN only and never appears in a message or log line.
"""

from __future__ import annotations

import os
from pathlib import Path

from forge_mlx.errors import ForgeError
from forge_mlx.model_files import is_hub_id


def upload_plan(folder: Path) -> list[tuple[str, int]]:
    """(relative path, bytes) of every file under `folder`, as upload_folder would send them."""
    return sorted((p.relative_to(folder).as_posix(), p.stat().st_size) for p in folder.rglob("*") if p.is_file())


def human(size: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    raise AssertionError("unreachable")


def push_to_hub(folder: Path, repo: str, *, dry_run: bool = False, log=print) -> list[tuple[str, int]]:
    """Upload `folder` to model repo `repo` (created when missing); with dry_run only list the files."""
    if not is_hub_id(repo):
        raise ForgeError(f"'{repo}' is not a hub repo id of the form owner/name", where="--push-to-hub")
    plan = upload_plan(folder)
    verb = "would upload" if dry_run else "uploading"
    log(f"{verb} {len(plan)} files ({human(sum(s for _, s in plan))}) to {repo}:")
    for name, size in plan:
        log(f"  {name:40s} {human(size):>10s}")
    if dry_run:
        log("dry run: nothing uploaded")
        return plan
    token = os.environ.get("HF_TOKEN")
    if not token:
        raise ForgeError("HF_TOKEN is not set", where="--push-to-hub", hint="export HF_TOKEN with a write token")
    from huggingface_hub import HfApi

    try:
        api = HfApi(token=token)
        api.create_repo(repo_id=repo, repo_type="model", exist_ok=True)
        api.upload_folder(
            folder_path=str(folder), repo_id=repo, repo_type="model", commit_message="Upload forge-mlx export"
        )
    except Exception as exc:  # the hub client raises many types: offline, auth, permissions, quota
        message = str(exc).replace(token, "***").splitlines()[0] if str(exc) else ""
        raise ForgeError(
            f"push to '{repo}' failed ({type(exc).__name__}: {message})",
            where="--push-to-hub",
            hint="check HF_TOKEN's write access and the network",
        ) from None
    log(f"pushed to https://huggingface.co/{repo}")
    return plan
