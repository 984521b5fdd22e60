"""Optional W&B reporting: records mirrored from metrics.jsonl, read back from W&B's own offline run file."""

from __future__ import annotations

import json
import struct
import sys
import time
from pathlib import Path

import pytest

from forge_mlx import reporting
from forge_mlx.config import load_config
from forge_mlx.errors import ForgeError
from forge_mlx.metrics_log import MetricsLog

RECORDS = [
    {"phase": "sft", "step": 1, "loss": 2.5, "lr": 1e-4, "padding_fraction": 0.02},
    {"phase": "sft", "step": 2, "loss": 2.0, "val_loss": 2.2},
    {"phase": "dpo", "step": 1, "loss": 0.69, "rewards/accuracies": 0.5, "note": "text is not a metric"},
]


def wandb_history(run_dir: Path) -> list[dict]:
    """History rows of the offline run under run_dir (its only one)."""
    (path,) = run_dir.glob("wandb/offline-run-*/run-*.wandb")
    return [row for kind, row in finished_records(path) if kind == "history"]


def wandb_exit_codes(run_dir: Path) -> list[int]:
    """The exit code each offline run under run_dir was finished with, oldest first."""
    paths = sorted(run_dir.glob("wandb/offline-run-*/run-*.wandb"), key=lambda p: p.parent.name)
    return [row for path in paths for kind, row in finished_records(path) if kind == "exit"]


def finished_records(path: Path, timeout: float = 30.0) -> list[tuple[str, object]]:
    """The records once the exit record is on disk: run.finish() returns before W&B's service process has
    flushed its file (seen once in ~15 runs here), so read until the run's last record is there."""
    deadline = time.monotonic() + timeout
    records = wandb_records(path)
    while not any(kind == "exit" for kind, _ in records) and time.monotonic() < deadline:
        time.sleep(0.1)
        records = wandb_records(path)
    return records


def wandb_records(path: Path) -> list[tuple[str, object]]:
    """("history", row) and ("exit", code) records of a .wandb file (LevelDB-log framing of protobuf Records:
    7-byte file header, 32 KiB blocks, 7-byte record headers, FULL/FIRST/MIDDLE/LAST chunks)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, block, pos, buf, rows = path.read_bytes(), 32768, 7, b"", []
    while pos + 7 <= len(data):
        room = block - pos % block
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7]) if room >= 7 else (0, 0, 0)
        if room < 7 or (kind == 0 and length == 0):  # block trailer or zero padding
            pos += room
            continue
        if pos + 7 + length > len(data):  # a record still being written
            break
        buf, pos = buf + data[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind in (1, 4):  # FULL or LAST: a whole record
            record = pb.Record()
            record.ParseFromString(buf)
            buf = b""
            kind = record.WhichOneof("record_type")
            if kind == "history":
                items = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item}
                rows.append(("history", {k: v for k, v in items.items() if not k.startswith("_")}))  # not _step
            elif kind == "exit":
                rows.append(("exit", record.exit.exit_code))
    return rows


def wandb_config(tmp_path: Path, report_to: str = "wandb"):
    return load_config(None, [f"output_dir={tmp_path / 'run'}", f"train.report_to={report_to}"])


def test_payload_puts_numbers_under_the_phase_and_drops_the_rest():
    assert reporting.wandb_payload(RECORDS[2]) == {
        "dpo/step": 1,
        "dpo/loss": 0.69,
        "dpo/rewards/accuracies": 0.5,
    }


def test_without_report_to_nothing_is_published(tmp_path):
    with reporting.session(wandb_config(tmp_path, "none"), tmp_path / "run"):
        assert reporting._sinks == []  # noqa: SLF001  (no sink opened)
        MetricsLog(tmp_path / "metrics.jsonl").write(RECORDS[0])
    assert (tmp_path / "metrics.jsonl").read_text() == json.dumps(RECORDS[0]) + "\n"
    assert not (tmp_path / "run").exists()  # no W&B folder, no id file


def test_records_reach_wandb_and_resume_continues_the_same_run(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    config = wandb_config(tmp_path)
    run_dir = Path(config.output_dir)
    with reporting.session(config, run_dir):
        log = MetricsLog(run_dir / "metrics.jsonl")
        for record in RECORDS:
            log.write(record)
    assert reporting._sinks == []  # noqa: SLF001  (closed with the session)
    assert wandb_history(run_dir) == [reporting.wandb_payload(r) for r in RECORDS]
    run_id = (run_dir / reporting.RUN_ID_FILE).read_text().strip()
    assert run_id.startswith("run-")
    time.sleep(1.1)  # W&B names an offline run's folder by the second it started
    with reporting.session(config, run_dir):  # a resumed run: the same W&B id
        pass
    assert (run_dir / reporting.RUN_ID_FILE).read_text().strip() == run_id
    assert len(list(run_dir.glob(f"wandb/offline-run-*-{run_id}"))) == 2


def test_a_data_parallel_rank_other_than_0_does_not_report(tmp_path):
    pytest.importorskip("wandb")
    with reporting.session(wandb_config(tmp_path), tmp_path / "run", main=False):
        assert reporting._sinks == []  # noqa: SLF001


@pytest.mark.parametrize("main", [True, False])
def test_missing_wandb_is_a_clear_error_on_every_rank(tmp_path, monkeypatch, main):
    monkeypatch.setitem(sys.modules, "wandb", None)  # find_spec and import see no wandb
    with pytest.raises(ForgeError, match="wandb package is not installed"):
        with reporting.session(wandb_config(tmp_path), tmp_path / "run", main=main):
            pass


def test_a_failed_or_interrupted_run_is_not_marked_finished(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    config = wandb_config(tmp_path)
    with pytest.raises(ForgeError, match="stopped"):
        with reporting.session(config, config.output_dir):
            raise ForgeError("stopped")
    time.sleep(1.1)  # W&B names an offline run's folder by the second it started
    with reporting.session(config, config.output_dir) as outcome:  # resumed, then Ctrl-C'd with a checkpoint
        outcome.exit_code = reporting.exit_code({"sft": {"interrupted": True}})
    time.sleep(1.1)
    with reporting.session(config, config.output_dir):  # resumed again, to the end
        pass
    assert wandb_exit_codes(Path(config.output_dir)) == [1, 130, 0]


@pytest.mark.parametrize("backend", ["mlx", "torch"])
def test_a_training_run_sends_every_metrics_record_to_wandb(tmp_path, monkeypatch, backend):
    """SFT then DPO on the tiny model: W&B's offline history is exactly metrics.jsonl, on either backend."""
    pytest.importorskip("wandb")
    if backend == "torch":
        pytest.importorskip("torch")
    import helpers

    from forge_mlx.metrics_log import read_metrics
    from forge_mlx.pipeline import run_training

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    extra = ["train.steps=3", "dpo.enabled=true", f"dpo.data={tmp_path / 'dpo'}", "dpo.steps=2", "dpo.grad_accum=1"]
    config = helpers.tiny_config(tmp_path, "run", f"backend={backend}", "train.report_to=wandb", *extra)
    run_training(config, log=helpers.quiet)
    records = read_metrics(Path(config.output_dir) / "metrics.jsonl")
    assert [(r["phase"], r["step"]) for r in records] == [("sft", 1), ("sft", 2), ("sft", 3), ("dpo", 1), ("dpo", 2)]
    assert wandb_history(Path(config.output_dir)) == [reporting.wandb_payload(r) for r in records]
