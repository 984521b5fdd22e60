"""Faults: a run stopped (crash, kill -9, Ctrl-C) and resumed ends exactly where an uninterrupted run ends; a
corrupted checkpoint is skipped by its checksum; non-finite losses or gradients skip the update, then stop the
run."""

import math
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import helpers
import mlx.core as mx
import numpy as np
import pytest

from forge_mlx import checkpoint as ckpt
from forge_mlx import train
from forge_mlx.adapters import adapter_weights
from forge_mlx.config import save_config
from forge_mlx.data.batching import BatchStream
from forge_mlx.errors import ForgeError
from forge_mlx.losses import sft_loss
from forge_mlx.metrics_log import read_metrics
from forge_mlx.pipeline import make_optimizer, run_training, sft_arrays

# 12 steps of batch 2 over 8 examples (3 epochs, so the data position crosses epochs), warmup + cosine (the
# optimizer's step count matters), dropout (the RNG matters), validation every 4 steps, checkpoints every 3.
RESUMABLE = (
    "train.steps=12",
    "train.save_every=3",
    "train.batch_size=2",
    "train.warmup_steps=2",
    "train.min_lr_ratio=0.1",
    "adapter.dropout=0.1",
    "train.val_batches=2",
    "train.steps_per_eval=4",
)
# The resumed run replays the same compiled computations on the restored arrays, so on this CPU it is
# bit-identical (measured 0.0); 1e-5 on losses of ~3 leaves room for a reduction order that is not fixed
# (threaded BLAS, GPU) without letting a wrong step, learning rate, RNG draw or batch through (those move the
# loss by > 1e-3 here).
LOSS_TOL = 1e-5
ADAPTER_TOL = 1e-6  # adapters of ~0.1-1 after the same float32 updates


class Crash(Exception):
    """Stands in for the process dying."""


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    run_training(helpers.tiny_config(root, "full", *RESUMABLE), log=helpers.quiet)
    return root


@pytest.fixture(scope="module")
def crashed(root) -> Path:
    """A run that died during step 8, after the checkpoint at step 6 and step 7's records were written."""
    write = train.MetricsLog.write

    def dying(self, record):
        if record.get("step") == 8 and "loss" in record:
            raise Crash
        write(self, record)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(train.MetricsLog, "write", dying)
        with pytest.raises(Crash):
            run_training(helpers.tiny_config(root, "crashed", *RESUMABLE), log=helpers.quiet)
    run = root / "crashed"
    assert [p.name for p in ckpt.list_checkpoints(run)] == ["sft-000003", "sft-000006"]
    assert max(helpers.losses(run)) == 7 and not (run / "adapters.safetensors").exists()
    return run


def resume_copy(root: Path, crashed: Path, name: str) -> tuple[Path, list[str]]:
    shutil.copytree(crashed, root / name)
    log = []
    run_training(helpers.tiny_config(root, name, *RESUMABLE), resume=True, log=log.append)
    return root / name, log


def assert_same_run(run: Path, full: Path) -> None:
    for key in ("loss", "val_loss"):
        want, got = helpers.losses(full, key=key), helpers.losses(run, key=key)
        assert sorted(got) == sorted(want)
        assert max(abs(got[s] - want[s]) for s in want) <= LOSS_TOL
    final = helpers.load_arrays(run / "adapters.safetensors")
    assert helpers.max_abs_diff(final, helpers.load_arrays(full / "adapters.safetensors")) <= ADAPTER_TOL


def test_resume_after_a_crash_matches_the_uninterrupted_run(root, crashed):
    run, log = resume_copy(root, crashed, "resumed")
    assert "  resumed sft from sft-000006 (step 6)" in log
    steps = [r["step"] for r in read_metrics(run / "metrics.jsonl") if "loss" in r]
    assert steps == list(range(1, 13))  # the crashed run's step 7 record is dropped on resume, then redone once
    assert_same_run(run, root / "full")


def test_resume_without_the_rng_would_differ(root, crashed, monkeypatch):
    """Control for the test above: with dropout on, a resume that does not restore the RNG draws other masks,
    so the losses after the resume move by far more than LOSS_TOL."""
    load = ckpt.load_into

    def without_rng(path, model, optimizer):
        load(path, model, optimizer)
        mx.random.seed(12345)

    monkeypatch.setattr(ckpt, "load_into", without_rng)
    run, _ = resume_copy(root, crashed, "no_rng")
    want, got = helpers.losses(root / "full"), helpers.losses(run)
    assert max(abs(got[s] - want[s]) for s in range(1, 7)) <= LOSS_TOL
    assert max(abs(got[s] - want[s]) for s in range(7, 13)) > 100 * LOSS_TOL


def test_corrupted_newest_checkpoint_is_skipped(root, crashed):
    run = root / "corrupt"
    shutil.copytree(crashed, run)
    newest = run / "checkpoints" / "sft-000006" / "adapters.safetensors"
    data = bytearray(newest.read_bytes())
    data[-5] ^= 0xFF  # one byte of tensor data: the file still parses, only the checksum can tell
    newest.write_bytes(bytes(data))
    assert ckpt.verify(newest.parent) is None and ckpt.verify(run / "checkpoints" / "sft-000003") is not None
    log = []
    run_training(helpers.tiny_config(root, "corrupt", *RESUMABLE), resume=True, log=log.append)
    assert "  checkpoint sft-000006 is incomplete or corrupted (checksum); using an earlier one" in log
    assert "  resumed sft from sft-000003 (step 3)" in log
    assert_same_run(run, root / "full")


# The subprocess runs: long enough (150 steps of ~10-30 ms) that a signal sent when the first checkpoint
# (step 10) appears lands mid-run; they compare against the same run done in-process without interruption.
LONG = (
    "train.steps=150",
    "train.save_every=10",
    "train.steps_per_report=10",
    "train.batch_size=2",
    "train.warmup_steps=5",
    "train.min_lr_ratio=0.1",
)


@pytest.fixture(scope="module")
def long_full(root) -> Path:
    run_training(helpers.tiny_config(root, "long_full", *LONG), log=helpers.quiet)
    return root / "long_full"


def start_and_signal(root: Path, name: str, sig: int) -> tuple[subprocess.Popen, Path, str]:
    """Start `python -m forge_mlx.cli train` and send `sig` once the first checkpoint exists."""
    config = root / f"{name}.yaml"
    save_config(helpers.tiny_config(root, name, *LONG), config)
    out = (root / f"{name}.out").open("w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "forge_mlx.cli", "train", str(config)],
        stdout=out,
        stderr=subprocess.STDOUT,
        text=True,
    )
    first = root / name / "checkpoints" / "sft-000010"
    deadline = time.monotonic() + 120
    while not first.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.send_signal(sig)
    proc.wait(timeout=60)
    out.close()
    return proc, config, (root / f"{name}.out").read_text()


@pytest.mark.slow
def test_kill_9_then_resume_ends_with_the_same_adapters(root, long_full):
    from forge_mlx.cli import main

    proc, config, output = start_and_signal(root, "killed", signal.SIGKILL)
    run = root / "killed"
    assert proc.returncode == -signal.SIGKILL, output
    steps = [ckpt.verify(p)["step"] for p in ckpt.list_checkpoints(run)]
    assert steps and steps[-1] < 150 and not (run / "sft_done.json").exists()  # it died mid-run
    assert main(["train", str(config), "--resume"]) == 0
    final = helpers.load_arrays(run / "adapters.safetensors")
    assert helpers.max_abs_diff(final, helpers.load_arrays(long_full / "adapters.safetensors")) <= ADAPTER_TOL
    want, got = helpers.losses(long_full), helpers.losses(run)
    assert sorted(got) == sorted(want) and max(abs(got[s] - want[s]) for s in want) <= LOSS_TOL


@pytest.mark.slow
def test_ctrl_c_writes_a_checkpoint_and_resume_continues(root, long_full):
    proc, config, output = start_and_signal(root, "ctrl_c", signal.SIGINT)
    run = root / "ctrl_c"
    assert proc.returncode == 130, output  # the shell's Ctrl-C code: the run did not finish
    line = next(x for x in output.splitlines() if "interrupted: checkpoint written at step" in x)
    step = int(line.split("step")[-1].split(";")[0])
    assert 10 <= step < 150 and not (run / "sft_done.json").exists()
    path, record = ckpt.latest_good(run, "sft")
    assert path.name == f"sft-{step:06d}" and record["step"] == step
    log = []
    run_training(helpers.tiny_config(root, "ctrl_c", *LONG), resume=True, log=log.append)
    assert f"  resumed sft from sft-{step:06d} (step {step})" in log
    final = helpers.load_arrays(run / "adapters.safetensors")
    assert helpers.max_abs_diff(final, helpers.load_arrays(long_full / "adapters.safetensors")) <= ADAPTER_TOL


def scaled_loss(model, tokens, mask, factor):
    """sft_loss times `factor`: 1 leaves it exact; NaN or inf makes the loss and its gradients non-finite."""
    loss, n_tokens = sft_loss(model, tokens, mask)
    return loss * factor, n_tokens, {}


@mx.custom_function
def grad_times(x, factor):
    """x in the forward; its gradient times `factor` in the backward (a finite loss with overflowing grads)."""
    return x


@grad_times.vjp
def _grad_times_vjp(primals, cotangent, output):
    return cotangent * primals[1], mx.zeros_like(primals[1])


def grad_scaled_loss(model, tokens, mask, factor):
    """sft_loss exactly, with gradients times `factor`: NaN or inf poisons the gradients only."""
    loss, n_tokens = sft_loss(model, tokens, mask)
    return grad_times(loss, factor), n_tokens, {}


@pytest.mark.parametrize("what", ["loss", "grad"])
@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_nonfinite_step_is_skipped_then_stops_with_the_last_good_checkpoint(tmp_path, bad, what):
    config = helpers.tiny_config(tmp_path)
    model, tokenizer = helpers.adapted_model(config)
    stream = BatchStream(helpers.sft_examples(config, tokenizer), 2, seed=0, pad_id=tokenizer.pad_token_id)
    clean = [sft_arrays(next(stream)) for _ in range(9)]
    # micro-batches in pairs (grad_accum 2); P = poisoned. Steps: [a b] ok, [c d] ok, [e P] skipped, [f g] ok,
    # [P h] [P P] [i P] skipped three times in a row = max_bad_steps -> stop.
    plan = [0, 1, 2, 3, 4, "P", 5, 6, "P", 7, "P", "P", 8, "P"]

    def feed(order):
        for item in order:
            (tokens, mask), n = clean[0 if item == "P" else item]
            yield (tokens, mask, mx.array(bad if item == "P" else 1.0)), n

    start = adapter_weights(model)

    def loop(run_dir, order, steps):
        optimizer = make_optimizer(3e-3, 10, 0, 1.0, 0.0)  # the same schedule for both runs
        loss_fn = scaled_loss if what == "loss" else grad_scaled_loss
        spec = dict(steps=steps, grad_accum=2, max_grad_norm=1.0, max_bad_steps=3)
        return helpers.run_loop(model, optimizer, loss_fn, feed(order), run_dir, **spec)

    with pytest.raises(ForgeError, match=f"3 non-finite steps in a row \\(last: {what}\\)"):
        loop(tmp_path / "bad", plan, 10)
    records = read_metrics(tmp_path / "bad" / "metrics.jsonl")
    skipped = f"skipped_nonfinite_{what}"
    assert [(r["step"], r.get("event", "loss")) for r in records] == [
        (1, "loss"),
        (2, "loss"),
        (3, skipped),
        (3, "loss"),
        (4, skipped),
        (4, skipped),
        (4, skipped),
    ]
    bad_losses = {r["loss"] for r in records if "event" in r}
    assert bad_losses == {str(bad)} if what == "loss" else all(math.isfinite(float(x)) for x in bad_losses)
    assert all(math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"]) for r in records if "event" not in r)
    after = {k: np.array(v) for k, v in adapter_weights(model).items()}
    path, record = ckpt.latest_good(tmp_path / "bad", "sft")
    assert path.name == "sft-000003" and record["step"] == 3 and all(ckpt.verify(p) for p in path.parent.iterdir())
    assert helpers.max_abs_diff(helpers.load_arrays(path / "adapters.safetensors"), after) == 0.0
    assert all(np.isfinite(v).all() for v in after.values())
    # the skipped steps changed nothing: three clean steps over the same good micro-batches give these weights
    model.load_weights(list(start.items()), strict=False)
    loop(tmp_path / "clean", [0, 1, 2, 3, 5, 6], 3)
    clean_after = {k: np.array(v) for k, v in adapter_weights(model).items()}
    assert helpers.max_abs_diff(clean_after, after) == 0.0
