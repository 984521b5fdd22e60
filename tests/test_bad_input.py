"""Bad input through the CLI: every case exits 2 with one line that names the file, line, field or layer.

The CLI runs in-process (`forge_mlx.cli.main` returns the exit code); test_cli.py runs a few of the same
through a real `forge-mlx` process. The safety cases at the end check what forge-mlx refuses to read or run.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
from fnmatch import fnmatch
from pathlib import Path

import mlx.core as mx
import pytest
from helpers import tiny_config

import forge_mlx.models as models
from forge_mlx.checkpoint import list_checkpoints
from forge_mlx.cli import main
from forge_mlx.config import load_config, save_config
from forge_mlx.model_files import HUB_PATTERNS, PICKLED, is_hub_id


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """A tiny llama folder (model/), SFT data (sft/) and preference data (dpo/), shared by the module."""
    root = tmp_path_factory.mktemp("tiny")
    tiny_config(root)
    return root


def run_cli(capsys, *args) -> tuple[int, str]:
    """Exit code and stderr of `forge-mlx ARGS`, run in-process."""
    code = main([str(a) for a in args])
    return code, capsys.readouterr().err


def assert_error(capsys, args, *parts: str) -> str:
    """The command exits 2 with one line 'error: ...' holding every part, and no traceback."""
    code, err = run_cli(capsys, *args)
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert code == 2, err
    assert len(lines) == 1 and "Traceback" not in err, err
    for part in parts:
        assert part in lines[0], lines[0]
    return lines[0]


def train_yaml(tiny: Path, tmp_path: Path, *overrides: str) -> Path:
    """A config file for a one-step run of the tiny model into tmp_path/run; overrides as for --set."""
    config = tiny_config(tiny, str(tmp_path / "run"), "train.steps=1", "train.batch_size=1", *overrides)
    save_config(config, tmp_path / "run.yaml")
    return tmp_path / "run.yaml"


def jsonl(path: Path, *rows) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


def chat(*turns: tuple[str, str]) -> dict:
    return {"messages": [{"role": role, "content": content} for role, content in turns]}


GOOD = chat(("user", "hello there"), ("assistant", "good"))


def model_variant(tiny: Path, tmp_path: Path, edit_config=None, files: dict | None = None) -> Path:
    """A copy of the tiny model folder with config.json edited and files replaced (None deletes)."""
    folder = tmp_path / "model"
    shutil.copytree(tiny / "model", folder)
    if edit_config:
        config = json.loads((folder / "config.json").read_text())
        edit_config(config)
        (folder / "config.json").write_text(json.dumps(config))
    for name, content in (files or {}).items():
        if content is None:
            (folder / name).unlink()
        else:
            (folder / name).write_bytes(content)
    return folder


# ---------------------------------------------------------------- config


@pytest.mark.parametrize(
    "text, parts",
    [
        (
            "model: m\ntrain:\n  lr: 1e-4\n  bacth_size: 2\n",
            [":4: unknown key 'train.bacth_size'", "'train.batch_size'"],
        ),
        ("model: m\ntrain:\n  lr: -1e-4\n", [":3: 'train.lr' is -0.0001; expected > 0"]),
        ("model: m\ntrain:\n  steps: many\n", [":3: 'train.steps' is 'many' (str); expected int or null"]),
        (
            "model: m\ntrain:\n  steps: 3\n   lr: 1\n",
            [":4: invalid YAML: mapping values are not allowed here"],
        ),
        ("adapter:\n  residual: nf8\n", [":2: 'adapter.residual' is 'nf8'; expected one of"]),
    ],
    ids=["unknown-key", "negative-lr", "wrong-type", "yaml-syntax", "bad-choice"],
)
def test_config_file_errors_name_file_line_and_key(capsys, tmp_path, text, parts):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    assert_error(capsys, ["train", path], f"error: {path}", *parts)


def test_missing_config_file(capsys, tmp_path):
    assert_error(capsys, ["train", tmp_path / "nope.yaml"], f"{tmp_path / 'nope.yaml'}: config file not found")


def test_bad_override_names_the_override(capsys, tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("model: m\n")
    assert_error(
        capsys,
        ["train", path, "--set", "adapter.rnak=4"],
        "--set adapter.rnak=4: unknown key 'adapter.rnak'",
        "did you mean 'adapter.rank'?",
    )


# ---------------------------------------------------------------- SFT data


@pytest.mark.parametrize(
    "rows, parts",
    [
        ([GOOD, '{"messages": [{"role": "user"'], ["train.jsonl:2: malformed JSON at column"]),
        ([{"conversation": [{"role": "user", "content": "hi"}]}],
         ["train.jsonl:1: unrecognised row with keys ['conversation']", 'rows must be {"messages": [...]}']),
        ([{"prompt": "hello"}], ["train.jsonl:1: field 'completion': missing field"]),
        ([GOOD, chat(("assistant", "good"), ("user", "hello"))],
         ["train.jsonl:2: field 'messages[0].role': the conversation must open with a user message"]),
        ([chat(("user", "hi"), ("system", "be kind"), ("assistant", "good"))],
         ["train.jsonl:1: field 'messages[1].role': a system message may only come first"]),
        ([chat(("user", "hi"), ("bot", "good"))],
         ["train.jsonl:1: field 'messages[1].role': unknown role 'bot'"]),
        ([chat(("user", "hi"))], ["train.jsonl:1: field 'messages': conversation has no assistant message"]),
        ([{"messages": [{"role": "user", "content": 5}, {"role": "assistant", "content": "x"}]}],
         ["train.jsonl:1: field 'messages[0].content': must be a string, got a number"]),
        (["[1, 2]"], ["train.jsonl:1: expected a JSON object, got a list"]),
        ([GOOD, {"text": "hello"}], ["train.jsonl:2: row is text format but earlier rows are chat"]),
        ([], ["train.jsonl: empty dataset: the file holds no rows"]),
        (["", "   "], ["train.jsonl: empty dataset: the file holds no rows"]),
        ([{"prompt": "why", "chosen": "good", "rejected": "bad"}],
         ["train.jsonl:1: sft training needs chat/completions/text rows but this file holds preference"]),
    ],
    ids=["malformed-json", "missing-messages", "missing-completion", "wrong-role-order", "late-system",
         "unknown-role", "no-assistant", "content-not-string", "not-an-object", "mixed-formats", "empty-file",
         "blank-lines", "preference-rows-for-sft"],
)  # fmt: skip
def test_sft_data_errors_name_file_line_and_field(capsys, tiny, tmp_path, rows, parts):
    data = jsonl(tmp_path / "train.jsonl", *rows)
    assert_error(capsys, ["train", train_yaml(tiny, tmp_path, f"data.train={data}")], f"error: {data}", *parts)
    assert not list_checkpoints(tmp_path / "run")


def test_non_utf8_bytes_name_line_and_byte(capsys, tiny, tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_bytes(json.dumps(GOOD).encode() + b'\n{"text": "caf\xe9"}\n')
    first = len(json.dumps(GOOD)) + 1
    # the bad byte sits 13 bytes into line 2 ({"text": "caf is 13 bytes)
    assert_error(
        capsys,
        ["train", train_yaml(tiny, tmp_path, f"data.train={data}")],
        f"{data}:2: not valid UTF-8 at byte offset {first + 13} (byte 0xe9)",
    )


def test_missing_data_path(capsys, tiny, tmp_path):
    assert_error(
        capsys,
        ["train", train_yaml(tiny, tmp_path, f"data.train={tmp_path / 'nope'}")],
        f"{tmp_path / 'nope'}: no train data found",
    )


@pytest.mark.parametrize(
    "overlong, counts",
    [
        ("drop", "8 were longer and dropped, 0 kept no supervised token"),
        ("truncate", "0 were longer and dropped, 8 kept no supervised token"),
    ],
)
def test_every_row_longer_than_max_seq_length_is_an_error_not_an_empty_run(capsys, tiny, tmp_path, overlong, counts):
    # a tiny chat row is >= 13 tokens, the first 10 before the reply (ChatML), so 8 tokens hold no target
    config = train_yaml(tiny, tmp_path, "data.max_seq_length=8", f"data.overlong={overlong}")
    assert_error(
        capsys,
        ["train", config],
        f"{tiny / 'sft' / 'train.jsonl'}: no example fits data.max_seq_length=8",
        counts,
        "raise data.max_seq_length",
    )


def test_tokenizer_without_chat_template(capsys, tiny, tmp_path):
    model = model_variant(tiny, tmp_path, files={"chat_template.jinja": None})
    tokenizer_config = json.loads((model / "tokenizer_config.json").read_text())
    tokenizer_config.pop("chat_template", None)
    (model / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    assert_error(
        capsys,
        ["train", train_yaml(tiny, tmp_path, f"model={model}")],
        f"{tiny / 'sft' / 'train.jsonl'}:1: field 'messages': the tokenizer has no chat template",
    )


# ---------------------------------------------------------------- preference data (DPO)


@pytest.mark.parametrize(
    "row, part",
    [
        ({"chosen": "good", "rejected": "bad"}, "field 'prompt': missing field"),
        ({"prompt": "why", "rejected": "bad"}, "field 'chosen': missing field"),
        ({"prompt": "why", "chosen": "good", "rejected": "good"},
         "field 'rejected': 'chosen' and 'rejected' are identical"),
        ({"prompt": [{"role": "user", "content": "why"}], "chosen": [{"role": "user", "content": "good"}],
          "rejected": [{"role": "assistant", "content": "bad"}]},
         "field 'chosen[0].role': must start with an assistant message"),
        (GOOD, "row is chat format but earlier rows are preference"),
    ],
    ids=["missing-prompt", "missing-chosen", "identical", "chosen-not-assistant", "chat-row-among-pairs"],
)  # fmt: skip
def test_preference_data_errors(capsys, tiny, tmp_path, row, part):
    data = jsonl(tmp_path / "pairs.jsonl", {"prompt": "how", "chosen": "fine", "rejected": "bad"}, row)
    config = train_yaml(tiny, tmp_path, "data.train=", "dpo.enabled=true", f"dpo.data={data}")
    assert_error(capsys, ["train", config], f"{data}:2: {part}")


def test_sft_rows_given_as_preference_data(capsys, tiny, tmp_path):
    config = train_yaml(tiny, tmp_path, "data.train=", "dpo.enabled=true", f"dpo.data={tiny / 'sft'}")
    assert_error(
        capsys,
        ["train", config],
        f"{tiny / 'sft' / 'train.jsonl'}:1: preference training needs preference rows but this file holds chat rows",
    )


def test_preference_pairs_all_too_long(capsys, tiny, tmp_path):
    config = train_yaml(
        tiny, tmp_path, "data.train=", "dpo.enabled=true", "data.max_seq_length=8", "data.overlong=drop"
    )
    assert_error(capsys, ["train", config], f"{tiny / 'dpo' / 'train.jsonl'}: no example fits data.max_seq_length=8")


# ---------------------------------------------------------------- models


def test_unknown_architecture(capsys, tiny, tmp_path):
    model = model_variant(tiny, tmp_path, lambda c: c.update(model_type="foo"))
    assert_error(
        capsys,
        ["info", model],
        f"{model / 'config.json'}: field 'model_type': architecture 'foo' is not supported by mlx-lm",
    )


def test_only_pickled_weights(capsys, tiny, tmp_path):
    model = model_variant(tiny, tmp_path, files={"model.safetensors": None, "pytorch_model.bin": b"not read"})
    assert_error(
        capsys,
        ["info", model],
        f"{model}: only pickled weights (pytorch_model.bin); forge-mlx never unpickles",
        "convert them to safetensors",
    )


@pytest.mark.parametrize(
    "edit, files, part",
    [
        (lambda c: c.pop("model_type"), None, "config.json: config.json has no 'model_type'"),
        (None, {"config.json": b'{\n  "model_type": "llama",\n}'},
         "config.json:3: config.json is not valid JSON"),
        (None, {"config.json": b"[1, 2]"}, "config.json: config.json must hold a JSON object"),
        (None, {"config.json": None}, "no config.json: not a Hugging Face model folder"),
        (None, {"model.safetensors": None}, "no model*.safetensors weights"),
        (None, {"model.safetensors": b"hello"}, "cannot load the model: [read] Unable to read"),
        (lambda c: c.update(hidden_size=32), None, "cannot load the model: Expected shape"),
        (lambda c: c.update(num_hidden_layers=3), None, "cannot load the model: Missing 9 parameters"),
        (lambda c: c.pop("hidden_size"), None, "cannot load the model: ModelArgs.__init__() missing"),
        (None, {"tokenizer.json": b"{not json"}, "cannot load the tokenizer: Failed to parse tokenizer.json"),
    ],
    ids=["no-model-type", "invalid-json", "json-list", "no-config", "no-weights", "corrupt-weights",
         "shape-mismatch", "missing-layers", "missing-config-key", "broken-tokenizer"],
)  # fmt: skip
def test_broken_model_folders(capsys, tiny, tmp_path, edit, files, part):
    model = model_variant(tiny, tmp_path, edit, files)
    assert_error(capsys, ["info", model], f"error: {model}", part)


def test_truncated_weights(capsys, tiny, tmp_path):
    weights = (tiny / "model" / "model.safetensors").read_bytes()
    model = model_variant(tiny, tmp_path, files={"model.safetensors": weights[: len(weights) // 2]})
    assert_error(capsys, ["info", model], f"{model}: cannot load the model:", "exceeding the size of the file")


def test_missing_model_path(capsys, tmp_path):
    assert_error(
        capsys,
        ["info", tmp_path / "nope"],
        f"{tmp_path / 'nope'}: model folder not found, and it is not a hub id of the form owner/name",
    )


def test_a_file_instead_of_a_model_folder(capsys, tmp_path):
    (tmp_path / "model.gguf").write_bytes(b"GGUF")
    assert_error(
        capsys,
        ["info", tmp_path / "model.gguf"],
        "a model must be a folder in Hugging Face layout",
        "forge-mlx import-gguf FILE OUT_DIR",
    )


def test_hub_id_while_offline(capsys, tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read once at import
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.chdir(tmp_path)
    assert_error(
        capsys,
        ["info", "nobody/no-such-model"],
        "error: nobody/no-such-model: ",
        "hub model 'nobody/no-such-model'",
        "HF_HUB_OFFLINE=1",
    )


# ---------------------------------------------------------------- adapters, output, run directory


@pytest.mark.parametrize(
    "overrides, part",
    [
        (["adapter.rank=40"], "model.layers.0.self_attn.k_proj: rank 40 does not fit a (32, 64) layer"),
        (["adapter.rank_pattern={layers.1.self_attn.q_proj: 0}"],
         "model.layers.1.self_attn.q_proj: rank 0 does not fit a (64, 64) layer"),
        (["adapter.residual=affine", "adapter.group_size=128"],
         "model.layers.0.self_attn.q_proj: group size 128 does not fit a layer with 64 input features"),
        (["adapter.targets=[q_proj, qkv_proj]"], "target 'qkv_proj' matches no linear layer in model.layers"),
        (["adapter.rank_pattern={layers.9.self_attn.q_proj: 2}"],
         "rank_pattern: key 'layers.9.self_attn.q_proj' matches no adapted layer"),
    ],
    ids=["rank-too-large", "rank-zero", "group-size", "unknown-target", "rank-pattern-key"],
)  # fmt: skip
def test_adapter_settings_that_do_not_fit_the_model(capsys, tiny, tmp_path, overrides, part):
    assert_error(capsys, ["train", train_yaml(tiny, tmp_path, *overrides)], part)


def test_output_dir_not_writable(capsys, tiny, tmp_path):
    # we run as root, so chmod cannot make a folder unwritable: put the run under a regular file instead
    (tmp_path / "file").write_text("x")
    config = train_yaml(tiny, tmp_path, f"output_dir={tmp_path / 'file' / 'run'}")
    assert_error(capsys, ["train", config], f"{tmp_path / 'file' / 'run'}: cannot write the run directory")


def test_resume_without_a_run_and_rerun_over_checkpoints(capsys, tiny, tmp_path):
    config = train_yaml(tiny, tmp_path)
    assert_error(capsys, ["train", config, "--resume"], f"{tmp_path / 'run'}: nothing to resume: no run here")
    assert run_cli(capsys, "train", config)[0] == 0
    assert_error(
        capsys,
        ["train", config],
        f"{tmp_path / 'run'}: the run directory already holds checkpoints",
        "pass --resume",
    )


# ---------------------------------------------------------------- GGUF import


def test_gguf_import_errors(capsys, tmp_path):
    from test_gguf_import import write_tiny_gguf

    write_tiny_gguf(tmp_path / "qwen.gguf", arch="qwen2")
    assert_error(
        capsys,
        ["import-gguf", tmp_path / "qwen.gguf", tmp_path / "out"],
        f"{tmp_path / 'qwen.gguf'}: GGUF architecture is 'qwen2', not 'llama'",
    )
    (tmp_path / "model.bin").write_bytes(b"\x80\x04K\x01.")
    assert_error(
        capsys,
        ["import-gguf", tmp_path / "model.bin", tmp_path / "out"],
        "not a GGUF file: it starts with b'\\x80\\x04K\\x01'",
    )
    assert_error(capsys, ["import-gguf", tmp_path / "nope.gguf", tmp_path / "out"], "GGUF file not found")
    write_tiny_gguf(tmp_path / "llama.gguf")
    (tmp_path / "file").write_text("x")
    assert_error(
        capsys,
        ["import-gguf", tmp_path / "llama.gguf", tmp_path / "file" / "out"],
        f"{tmp_path / 'file' / 'out'}: cannot create the output folder",
    )
    assert not (tmp_path / "out").exists()


def test_unknown_command_and_missing_argument_are_usage_errors(capsys):
    code, err = run_cli(capsys, "trian")
    assert code == 2 and "No such command 'trian'" in err and "Traceback" not in err
    code, err = run_cli(capsys, "train")
    assert code == 2 and "Missing argument 'CONFIG_FILE'" in err


# ---------------------------------------------------------------- disk full


@pytest.fixture
def small_disk(tmp_path):
    """A 48 KiB tmpfs: room for the run's config and initial adapters, not for its first checkpoint."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a size-limited tmpfs needs root")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=48k", "tmpfs", str(disk)], capture_output=True)
    if mounted.returncode:
        pytest.skip(f"mount not permitted here: {mounted.stderr.decode().strip()}")
    try:
        yield disk
    finally:
        subprocess.run(["umount", str(disk)], check=True)


def test_disk_full_is_a_clear_error_and_leaves_nothing_half_written(capsys, tiny, tmp_path, small_disk):
    run = small_disk / "run"
    config = train_yaml(tiny, tmp_path, f"output_dir={run}", "train.steps=2", "train.save_every=1")
    message = assert_error(
        capsys,
        ["train", config],
        f"{run / 'checkpoints' / 'sft-000001'}: cannot write sft-000001",
        "check free disk space",
        "the earlier checkpoints are intact",
    )
    assert "Unable to write" in message or "No space left" in message
    written = sorted(p.relative_to(run).as_posix() for p in run.rglob("*"))
    # everything before the checkpoint is whole; the checkpoint folder holds no partial entry
    assert written == ["adapter_config.json", "adapters_init.safetensors", "checkpoints", "config.yaml",
                       "metrics.jsonl"]  # fmt: skip
    assert load_config(run / "config.yaml") == load_config(config)
    ranks = json.loads((run / "adapter_config.json").read_text())["ranks"]
    init = mx.load(str(run / "adapters_init.safetensors"))  # loads: the file is complete
    assert sorted(init) == sorted(f"{path}.{name}" for path in ranks for name in ("lora_a", "lora_b"))
    # with room again, the same run resumes and finishes
    subprocess.run(["mount", "-o", "remount,size=4m", str(small_disk)], check=True)
    assert run_cli(capsys, "train", config, "--resume")[0] == 0
    assert [p.name for p in list_checkpoints(run)] == ["sft-000001", "sft-000002"]


# ---------------------------------------------------------------- safety


class _Unpickled:
    """Unpickling this creates the marker file: proof that a pickle was loaded."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').close()",))


_OPENED: list[str] = []
_AUDITING = {"on": False}


def _audit(event: str, args: tuple) -> None:
    if _AUDITING["on"] and event == "open" and isinstance(args[0], (str, bytes, os.PathLike)):
        _OPENED.append(os.fsdecode(args[0]))


def test_pickled_files_beside_safetensors_are_never_opened(capsys, tiny, tmp_path):
    marker = tmp_path / "UNPICKLED"
    payload = pickle.dumps(_Unpickled(marker))
    model = model_variant(tiny, tmp_path, files={"pytorch_model.bin": payload, "training_args.pt": payload})
    sys.addaudithook(_audit)  # hooks cannot be removed; this one records only while _AUDITING is on
    _OPENED.clear()
    _AUDITING["on"] = True
    try:
        code, err = run_cli(capsys, "info", model)
    finally:
        _AUDITING["on"] = False
    assert code == 0, err
    assert not marker.exists()
    assert not [p for p in _OPENED if p.endswith((".bin", ".pt"))]
    assert any(p.endswith("tokenizer_config.json") for p in _OPENED)  # the hook did see the loader's opens


def test_hub_downloads_only_safetensors_and_data_files():
    pickled_or_code = ["pytorch_model.bin", "model.pt", "model.pth", "model.ckpt", "x.pkl", "modeling_x.py",
                       "tokenization_x.py", "model.gguf", "flax_model.msgpack", "tf_model.h5"]  # fmt: skip
    assert not [name for name in pickled_or_code for pattern in HUB_PATTERNS if fnmatch(name, pattern)]
    needed = ["config.json", "model.safetensors", "model-00001-of-00002.safetensors", "tokenizer.json",
              "tokenizer_config.json", "tokenizer.model", "chat_template.jinja"]  # fmt: skip
    assert all(any(fnmatch(name, pattern) for pattern in HUB_PATTERNS) for name in needed)
    assert all(fnmatch(name, pattern) for name, pattern in zip(pickled_or_code[:5], PICKLED, strict=True))


def test_remote_code_is_refused(capsys, tiny, tmp_path):
    model = model_variant(
        tiny,
        tmp_path,
        lambda c: c.update(auto_map={"AutoModelForCausalLM": "modeling.Model"}),
        files={"modeling.py": f"open({str(tmp_path / 'RAN')!r}, 'w').close()\n".encode()},
    )
    assert_error(
        capsys,
        ["info", model],
        f"{model / 'config.json'}: this model needs custom remote code, which forge-mlx never runs",
    )
    assert not (tmp_path / "RAN").exists()


def test_custom_tokenizer_code_is_never_imported(capsys, tiny, tmp_path):
    tokenizer_config = json.loads((tiny / "model" / "tokenizer_config.json").read_text())
    tokenizer_config["auto_map"] = {"AutoTokenizer": ["tokenization_x.XTokenizer", None]}
    code = f"open({str(tmp_path / 'RAN')!r}, 'w').close()\n".encode()
    model = model_variant(
        tiny,
        tmp_path,
        files={"tokenizer_config.json": json.dumps(tokenizer_config).encode(), "tokenization_x.py": code},
    )
    assert run_cli(capsys, "info", model)[0] == 0  # the standard tokenizer class loads; the .py never runs
    assert not (tmp_path / "RAN").exists()


@pytest.mark.parametrize(
    "name",
    ["../../etc", "a/../../b", "a/..", "../x/y", "owner/..", "owner/name/../../x", "/abs/owner/name", "a/b..",
     "owner\\name", "-owner/name", "owner/name?x=1", "owner/ name", ""],
)  # fmt: skip
def test_paths_are_never_taken_for_hub_ids(name):
    assert not is_hub_id(name)


@pytest.mark.parametrize("name", ["HuggingFaceTB/SmolLM2-135M-Instruct", "org/model.v1_2-x", "a/b"])
def test_plain_hub_ids_are_hub_ids(name):
    assert is_hub_id(name)


@pytest.mark.parametrize("name", ["../../nowhere", "a/../../b", "x/y/../z", "a/b.."])
def test_a_missing_path_is_not_sent_to_the_hub(capsys, tmp_path, monkeypatch, name):
    monkeypatch.chdir(tmp_path)
    home = sys.modules[models.resolve_model_path.__module__]  # where the resolver looks _download up
    monkeypatch.setattr(home, "_download", lambda repo: pytest.fail(f"{repo!r} was sent to the hub"))
    assert_error(capsys, ["info", name], f"{name}: model folder not found, and it is not a hub id")
