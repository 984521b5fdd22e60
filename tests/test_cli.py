"""The `forge-mlx` entry point: exit codes, one-line errors (tracebacks only with --debug), and secrets.

Two cases run the installed `forge-mlx` script in a real process, to prove what a user sees: the exit code
and stderr with no traceback. Tokens from the environment must never reach any output or file of a run.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import tiny_config

import forge_mlx
import forge_mlx.pipeline as pipeline
from forge_mlx.cli import main
from forge_mlx.config import save_config
from forge_mlx.errors import ForgeError

FORGE_MLX = Path(sys.executable).with_name("forge-mlx")  # the console script of this environment
SECRET = "secret-xyz-31415"


def run_process(args: list, cwd: Path, **env: str) -> subprocess.CompletedProcess:
    """`forge-mlx ARGS` in a fresh process, offline, with a throwaway HF home and the extra environment."""
    base = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING"))}
    env = {**base, "HF_HUB_OFFLINE": "1", "HF_HOME": str(cwd / "hf-home"), **env}
    return subprocess.run([str(FORGE_MLX), *map(str, args)], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)  # fmt: skip


def assert_one_line_error(result: subprocess.CompletedProcess, *parts: str) -> None:
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr and "Traceback" not in result.stdout
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for part in parts:
        assert part in lines[0]


def test_version_and_help_exit_0(capsys):
    assert main(["--version"]) == 0
    assert forge_mlx.__version__ in capsys.readouterr().out
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert all(command in out for command in ("train", "info", "doctor", "import-gguf"))


def test_debug_shows_the_traceback(tmp_path):
    with pytest.raises(ForgeError, match="config file not found"):
        main(["--debug", "train", str(tmp_path / "nope.yaml")])


def test_os_errors_outside_checked_writes_are_one_line_too(capsys, tmp_path, monkeypatch):
    metrics = tmp_path / "run" / "metrics.jsonl"

    def disk_full(config, resume=False):
        raise OSError(28, "No space left on device", str(metrics))

    monkeypatch.setattr(pipeline, "run_training", disk_full)
    (tmp_path / "run.yaml").write_text("model: m\n")
    assert main(["train", str(tmp_path / "run.yaml")]) == 2
    expected = f"error: {metrics}: No space left on device (check free disk space and permissions)\n"
    assert capsys.readouterr().err == expected
    with pytest.raises(OSError):
        main(["--debug", "train", str(tmp_path / "run.yaml")])


def test_a_real_process_prints_one_line_for_a_config_error(tmp_path):
    (tmp_path / "run.yaml").write_text("model: m\ntrain:\n  lr: -1\n")
    result = run_process(["train", "run.yaml"], tmp_path)
    assert_one_line_error(result, "error: run.yaml:3: 'train.lr' is -1.0; expected > 0")
    result = run_process(["train", "nope.yaml"], tmp_path)
    assert_one_line_error(result, "error: nope.yaml: config file not found")


def test_a_real_process_prints_one_line_for_a_hub_error_and_never_the_token(tmp_path):
    result = run_process(["info", "nobody/no-such-model"], tmp_path, HF_TOKEN=SECRET, HUGGING_FACE_HUB_TOKEN=SECRET)
    assert_one_line_error(result, "error: nobody/no-such-model: ", "hub model 'nobody/no-such-model'")
    assert SECRET not in result.stdout + result.stderr
    assert not (tmp_path / "hf-home").exists()  # offline: nothing was cached or written


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """path -> (size, mtime) of every file under root."""
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*") if p.is_file()}


def test_a_full_run_never_writes_the_token_and_writes_only_where_asked(capfd, tmp_path, monkeypatch):
    config = tiny_config(tmp_path, "out/run", "train.steps=2", "train.batch_size=2", "train.save_every=1",
                         "dpo.enabled=true", "dpo.steps=1", "dpo.grad_accum=1")  # fmt: skip
    work = tmp_path / "work"
    work.mkdir()
    save_config(config, work / "run.yaml")
    before = snapshot(tmp_path)
    monkeypatch.chdir(work)
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
        monkeypatch.setenv(name, SECRET)
    assert main(["train", "run.yaml"]) == 0
    out = capfd.readouterr()  # file-descriptor capture: also what C code and child processes print
    run = tmp_path / "out" / "run"
    assert {"config.yaml", "adapters.safetensors", "summary.json", "metrics.jsonl"} <= {p.name for p in run.iterdir()}
    assert SECRET not in out.out + out.err
    assert not [p for p in run.rglob("*") if p.is_file() and SECRET.encode() in p.read_bytes()]
    # outside the run directory nothing changed: not the model, the data or the working folder
    after = {path: meta for path, meta in snapshot(tmp_path).items() if not path.startswith("out/")}
    assert after == before
