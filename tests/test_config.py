"""config.py: YAML + `--set` overrides into typed dataclasses; strict keys, types, ranges; located errors."""

from pathlib import Path

import pytest
import yaml

from forge_mlx.config import (
    Config,
    load_config,
    parse_override,
    reference,
    save_config,
    to_dict,
)
from forge_mlx.errors import ForgeError


def write(tmp_path: Path, text: str, name: str = "run.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def error_of(*args, **kwargs) -> str:
    with pytest.raises(ForgeError) as info:
        load_config(*args, **kwargs)
    return str(info.value)


def flatten(mapping: dict, prefix: str = ""):
    """(dotted key, value) of a nested dict, walked independently of config.reference()."""
    for key, value in mapping.items():
        if isinstance(value, dict) and key != "rank_pattern":
            yield from flatten(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def test_no_file_gives_the_documented_defaults():
    config = load_config(None)
    assert config == Config()
    a, t, d = config.adapter, config.train, config.dpo
    assert (a.init, a.rank, a.alpha, a.targets, a.residual, a.blocksize, a.double_quant) == (
        "pissa", 64, 128.0, "attention", "nf4", 64, True)  # fmt: skip
    assert (t.lr, t.grad_accum, t.grad_checkpoint, config.memory.alert_threshold) == (2e-4, 4, True, 0.8)
    assert (d.beta, d.lr, d.loss, d.enabled) == (0.1, 5e-5, "sigmoid", False)


def test_empty_file_is_the_defaults(tmp_path):
    assert load_config(write(tmp_path, "# nothing here\n")) == Config()


def test_file_values_and_overrides_merge_with_overrides_last(tmp_path):
    path = write(tmp_path, "model: m\ntrain:\n  lr: 1e-3\n  steps: 5\nadapter:\n  targets: [q_proj]\n")
    config = load_config(path, ["train.steps=7", "adapter.rank=8", "data.train=d.jsonl", "train.steps=9"])
    assert config.model == "m"
    assert config.train.lr == 1e-3  # YAML 1.1 reads 1e-3 as a string; the float field takes it
    assert config.train.steps == 9  # the last override wins
    assert config.adapter.rank == 8 and config.adapter.targets == ["q_proj"]
    assert config.data.train == "d.jsonl"
    assert config.train.batch_size == Config().train.batch_size  # untouched keys keep their defaults


def test_override_values_are_read_as_yaml():
    config = load_config(None, [
        "adapter.targets=[q_proj, v_proj]", "adapter.rank_pattern={layers.0.self_attn.q_proj: 16}",
        "train.grad_checkpoint=false", "train.lr=3e-4", "train.steps=", "adapter.alpha=16",
    ])  # fmt: skip
    assert config.adapter.targets == ["q_proj", "v_proj"]
    assert config.adapter.rank_pattern == {"layers.0.self_attn.q_proj": 16}
    assert config.train.grad_checkpoint is False
    assert config.train.lr == 3e-4 and config.train.steps is None
    assert config.adapter.alpha == 16.0 and isinstance(config.adapter.alpha, float)  # int accepted for float


def test_parse_override_splits_on_the_first_equals_sign():
    assert parse_override("data.train=a=b.jsonl") == (["data", "train"], "a=b.jsonl")
    assert parse_override(" train.lr =1e-4") == (["train", "lr"], "1e-4")
    assert parse_override("train.steps=") == (["train", "steps"], None)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("modle: x\n", "run.yaml:1: unknown key 'modle' (did you mean 'model'?)"),
        (
            "train:\n  batch_size: 2\n  lrr: 1\n",
            "run.yaml:3: unknown key 'train.lrr' (did you mean 'train.lr'?)",
        ),
        (
            "train:\n  leraning_rate: 1\n",
            "run.yaml:2: unknown key 'train.leraning_rate' (valid keys: steps, ",
        ),
        ("adaptor:\n  rank: 4\n", "run.yaml:1: unknown key 'adaptor' (did you mean 'adapter'?)"),
    ],
)
def test_unknown_keys_are_errors_with_the_nearest_key(tmp_path, text, expected):
    assert expected in error_of(write(tmp_path, text))


def test_unknown_override_key_points_at_the_override():
    message = error_of(None, ["train.bacth_size=2"])
    assert message.startswith("--set train.bacth_size=2: unknown key 'train.bacth_size'")
    assert "did you mean 'train.batch_size'?" in message


@pytest.mark.parametrize(
    "text, expected",
    [
        ("train:\n  batch_size: four\n", "run.yaml:2: 'train.batch_size' is 'four' (str); expected int"),
        ("train:\n  batch_size: true\n", "run.yaml:2: 'train.batch_size' is True (bool); expected int"),
        ("train:\n  batch_size: 2.5\n", "run.yaml:2: 'train.batch_size' is 2.5 (float); expected int"),
        ("train:\n  lr: fast\n", "run.yaml:2: 'train.lr' is 'fast' (str); expected float"),
        ("train:\n  steps: []\n", "run.yaml:2: 'train.steps' is [] (list); expected int or null"),
        ("model: 5\n", "run.yaml:1: 'model' is 5 (int); expected str"),
        ("adapter:\n  targets: [q_proj, 3]\n", "expected str or a list of str"),
        ("adapter:\n  rank_pattern: {q_proj: x}\n", "expected a mapping of str to int"),
        ("train: 5\n", "run.yaml:1: 'train' must be a section (a mapping of keys)"),
    ],
)
def test_wrong_types_name_the_key_line_and_expected_type(tmp_path, text, expected):
    assert expected in error_of(write(tmp_path, text))


@pytest.mark.parametrize(
    "override, expected",
    [
        ("train.lr=-1e-4", "'train.lr' is -0.0001; expected > 0"),
        ("train.lr=0", "'train.lr' is 0.0; expected > 0"),
        ("adapter.rank=0", "'adapter.rank' is 0; expected >= 1"),
        ("adapter.dropout=1.5", "'adapter.dropout' is 1.5; expected <= 1"),
        ("memory.alert_threshold=0", "'memory.alert_threshold' is 0.0; expected > 0"),
        ("adapter.residual=nf8", "'adapter.residual' is 'nf8'; expected one of ['none', 'affine', 'nf4']"),
        ("adapter.group_size=48", "'adapter.group_size' is 48; expected one of [32, 64, 128]"),
        ("dpo.label_smoothing=0.5", "'dpo.label_smoothing' is 0.5; expected <= 0.49"),
        ("data.max_seq_length=4", "'data.max_seq_length' is 4; expected >= 8"),
    ],
)
def test_out_of_range_values_are_refused(override, expected):
    assert error_of(None, [override]) == f"--set {override}: {expected}"


def test_range_errors_in_a_file_name_the_line(tmp_path):
    path = write(tmp_path, "model: m\ntrain:\n  steps: 3\n  lr: -0.1\n")
    assert error_of(path) == f"{path}:4: 'train.lr' is -0.1; expected > 0"


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (["train.steps=3", "train.epochs=1"], "set train.steps or train.epochs, not both"),
        (["dpo.steps=3", "dpo.epochs=1"], "set dpo.steps or dpo.epochs, not both"),
        (["dpo.enabled=true"], "'dpo.enabled' is true but 'dpo.data' is not set"),
        (["adapter.init=pissa_niter_x"], "'adapter.init' is 'pissa_niter_x'; expected pissa, pissa_niter_N"),
        (["adapter.init=olora"], "'adapter.init' is 'olora'"),
    ],
)
def test_inconsistent_settings_are_refused(overrides, expected):
    assert expected in error_of(None, overrides)


def test_randomized_pissa_init_is_accepted():
    assert load_config(None, ["adapter.init=pissa_niter_4"]).adapter.init == "pissa_niter_4"


@pytest.mark.parametrize(
    "text, line, problem",
    [
        ("model: a\ntrain:\n  lr: 1\n   steps: 3\n", 4, "mapping values are not allowed here"),
        ("model: a\ntrain:\n\tlr: 1\n", 3, "found character '\\t' that cannot start any token"),
        # the parser notices at line 4; the message also points at the bracket opened on line 3
        ("model: a\ntrain:\n  lr: [1, 2\n  steps: 3\n", 4, "(while parsing a flow sequence at line 3)"),
    ],
)
def test_yaml_syntax_errors_carry_the_line(tmp_path, text, line, problem):
    path = write(tmp_path, text)
    message = error_of(path)
    assert message.startswith(f"{path}:{line}: invalid YAML: ") and problem in message


def test_duplicate_keys_are_errors_not_silently_the_last(tmp_path):
    # PyYAML keeps the last 'train' section whole, which would silently drop lr: 1
    path = write(tmp_path, "train:\n  lr: 1\nadapter: {}\ntrain:\n  steps: 3\n")
    assert error_of(path) == f"{path}:4: duplicate key 'train' (first on line 1)"
    path = write(tmp_path, "train: {lr: 1, lr: 2}\n")
    assert error_of(path) == f"{path}:1: duplicate key 'train.lr' (first on line 1)"


def test_file_level_errors(tmp_path):
    assert error_of(tmp_path / "nope.yaml") == f"{tmp_path / 'nope.yaml'}: config file not found"
    path = write(tmp_path, "- a\n- b\n")
    assert error_of(path) == f"{path}: a config file must be a mapping of sections and keys"
    path = tmp_path / "latin1.yaml"
    path.write_bytes("model: caf\xe9\n".encode("latin-1"))
    assert error_of(path) == f"{path}: config is not UTF-8 (byte 10)"


def test_override_errors_point_at_the_override(tmp_path):
    assert error_of(None, ["train.lr"]) == "--set: override 'train.lr' is not of the form section.key=value"
    assert error_of(None, ["model.x=1"]) == "--set model.x=1: 'model' is {'x': 1} (dict); expected str"
    path = write(tmp_path, "model: m\n")
    assert error_of(path, ["model.x=1"]) == "--set: 'model.x': 'model' is not a section"


def test_saved_config_reloads_to_an_equal_config(tmp_path):
    config = load_config(None, [
        "model=some/model", "adapter.rank=8", "adapter.targets=[q_proj, v_proj]",
        "adapter.rank_pattern={layers.0.self_attn.q_proj: 4}", "adapter.residual=affine", "train.steps=12",
        "train.lr=1e-5", "data.train=data/sft", "dpo.enabled=true", "dpo.data=data/dpo",
        "memory.cache_limit_gb=2",
    ])  # fmt: skip
    save_config(config, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == config
    assert yaml.safe_load((tmp_path / "config.yaml").read_text()) == to_dict(config)
    save_config(Config(), tmp_path / "defaults.yaml")
    assert load_config(tmp_path / "defaults.yaml") == Config()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.yaml", "defaults.yaml"]  # no temp file


def test_save_config_leaves_no_torn_file_when_the_write_fails(tmp_path):
    target = tmp_path / "run" / "config.yaml"  # the folder does not exist: the write fails
    with pytest.raises(OSError):
        save_config(Config(), target)
    assert not (tmp_path / "run").exists()


def test_reference_lists_every_key_once_with_help_and_its_default():
    rows = reference()
    flat = dict(flatten(to_dict(Config())))
    assert [key for key, _, _ in rows] == list(flat)  # every key, once, in declaration order
    assert {key: default for key, default, _ in rows} == {key: repr(value) for key, value in flat.items()}
    assert all(help_text.strip() for _, _, help_text in rows)


def test_pissa_at_a_lora_sized_lr_gets_a_note_and_lora_does_not():
    from forge_mlx.phases import pissa_lr_note

    assert "PiSSA usually wants 2e-5 to 5e-5" in pissa_lr_note("pissa_niter_4", 2e-4)
    assert pissa_lr_note("pissa", 5e-5) is None and pissa_lr_note("lora", 2e-4) is None
