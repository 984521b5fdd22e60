"""Export from tiny real runs (run_training, 3 steps): the merged HF folder, the PEFT and mlx-lm adapters,
checked against the in-memory trained model (runs.load_run) through the reference loaders (transformers, PEFT,
mlx-lm)."""

import json
import socket
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from helpers import MODEL_ARGS, tiny_config, tiny_llama
from mlx.utils import tree_flatten

from forge_mlx.adapters import apply_adapters
from forge_mlx.cli import main
from forge_mlx.errors import ForgeError
from forge_mlx.export import export_run
from forge_mlx.export.convert import lora_factors, pissa_to_lora
from forge_mlx.export.hf import match_base_names, parse_size, write_safetensors
from forge_mlx.pipeline import run_training
from forge_mlx.runs import load_run

# Token ids of the tiny vocabulary (34 used of 64), a short chat-like sequence and one with padding ids.
INPUTS = [[31, 3, 1, 7, 8, 32, 1, 31, 4, 1], [5, 9, 12, 20, 2, 33, 33, 6]]
# fp32 throughout: the export and the in-memory model differ only by summation order (~1e-6 on logits ~3);
# 1e-4 leaves room for BLAS differences between MLX and torch without hiding a wrong factor or key.
TOL = 1e-4
ROOT = Path(__file__).resolve().parents[1]
SMOL = "models/SmolLM2-135M-Instruct"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two finished 3-step SFT runs on the tiny llama: all-linear PiSSA over a full-precision residual (one
    layer at rank 2 to exercise per-layer ranks), and attention-only PiSSA over NF4 (the MLP stored 4-bit)."""
    root = tmp_path_factory.mktemp("export")
    common = ("train.steps=3", "dpo.enabled=false", "adapter.init=pissa")
    none = tiny_config(
        root,
        "run_none",
        *common,
        "adapter.residual=none",
        "adapter.targets=all-linear",
        "adapter.rank_pattern={layers.0.self_attn.q_proj: 2}",
    )
    nf4 = tiny_config(root, "run_nf4", *common, "adapter.residual=nf4", "adapter.targets=attention")
    for config in (none, nf4):
        run_training(config, log=lambda *a: None)
    return {"root": root, "base": root / "model", "none": root / "run_none", "nf4": root / "run_nf4"}


def trained_logits(run_dir: Path) -> np.ndarray:
    model = load_run(run_dir)[0]
    return np.stack([np.array(model(mx.array(ids)[None])[0, -8:]) for ids in INPUTS])  # (2, 8, vocab)


def mlx_logits(model) -> np.ndarray:
    return np.stack([np.array(model(mx.array(ids)[None])[0, -8:]) for ids in INPUTS])


def torch_logits(model) -> np.ndarray:
    import torch

    with torch.no_grad():
        return np.stack([model(torch.tensor([ids])).logits[0, -8:].numpy() for ids in INPUTS])


def export(runs, run: str, fmt: str, name: str, **options) -> dict:
    return export_run(runs[run], fmt, runs["root"] / name, log=lambda *a: None, **options)


@pytest.fixture(scope="module")
def hf_export(runs):
    """The NF4 run merged, in 40 KB shards so that loading goes through the shard index."""
    return export(runs, "nf4", "hf", "hf_out", shard_size="40KB")


def test_hf_export_layout(runs, hf_export):
    out = hf_export["out"]
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(out.glob("model-*.safetensors"))
    assert len(shards) > 1 and set(index["weight_map"].values()) == {p.name for p in shards}
    # the base's key set exactly (mlx-lm's names are the checkpoint's for llama), every shard within 40 KB
    base_keys = set(mx.load(str(runs["base"] / "model.safetensors")))
    assert set(index["weight_map"]) == base_keys
    assert all(p.stat().st_size <= 40_000 + 1_000 or len(mx.load(str(p))) == 1 for p in shards)  # + header
    config = json.loads((out / "config.json").read_text())
    assert config["torch_dtype"] == "float32" and "quantization" not in config and "quantization_config" not in config
    assert {"tokenizer.json", "tokenizer_config.json", "README.md"} <= {p.name for p in out.iterdir()}
    card = (out / "README.md").read_text()
    assert "PiSSA" in card and "NF4" in card and "| sft | final_loss |" in card
    assert not list(runs["root"].glob(".hf_out.partial-*"))


def test_hf_export_equals_trained_model_in_mlx_lm(runs, hf_export):
    """The NF4 run's export (adapters merged, 4-bit MLP dequantized) computes what load_run's model does."""
    from mlx_lm import load

    model, _ = load(str(hf_export["out"]))
    assert np.abs(mlx_logits(model) - trained_logits(runs["nf4"])).max() < TOL


def test_hf_export_equals_trained_model_in_transformers(runs, hf_export):
    pytest.importorskip("torch")
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(hf_export["out"]), dtype="float32").eval()
    assert np.abs(torch_logits(model) - trained_logits(runs["nf4"])).max() < TOL


def test_peft_adapter_on_original_base_equals_trained_model(runs):
    """PiSSA -> rank-2r LoRA: PEFT on the ORIGINAL base reproduces the trained model (fp32 residual)."""
    pytest.importorskip("torch")
    pytest.importorskip("peft")
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    result = export(runs, "none", "peft", "peft_out")
    config = json.loads((result["out"] / "adapter_config.json").read_text())
    # rank 4 -> 8 (A' = [A | A0]); alpha 8 -> 16 keeps alpha / r = 2; the rank-2 layer -> 4 at the same alpha
    assert (config["r"], config["lora_alpha"]) == (8, 16.0)
    assert config["rank_pattern"] == {"model.layers.0.self_attn.q_proj": 4} and config["alpha_pattern"] == {}
    assert config["target_modules"] == sorted(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )
    base = AutoModelForCausalLM.from_pretrained(str(runs["base"]), dtype="float32")
    model = PeftModel.from_pretrained(base, str(result["out"])).eval()
    assert np.abs(torch_logits(model) - trained_logits(runs["none"])).max() < TOL
    error = result["conversion_error"]
    assert error["adapted_layers"]["max"] < 1e-5 and error["frozen_quantized_layers"] is None
    assert error["logits"]["max_abs_diff"] < TOL and error["logits"]["top1_agreement"] == 1.0


def test_mlx_lm_adapter_on_original_base_equals_trained_model(runs):
    """mlx_lm.load(base, adapter_path): one rank and scale for all layers (the rank-2 layer zero-padded, its
    larger scale folded into lora_b) still reproduces the trained model."""
    from mlx_lm import load

    result = export(runs, "none", "mlx-lm", "mlx_out")
    config = json.loads((result["out"] / "adapter_config.json").read_text())
    assert config["fine_tune_type"] == "lora" and config["num_layers"] == MODEL_ARGS["num_hidden_layers"]
    assert config["lora_parameters"] == {
        "rank": 8,
        "scale": 2.0,
        "dropout": 0.0,
        "keys": sorted(
            [
                "self_attn.q_proj",
                "self_attn.k_proj",
                "self_attn.v_proj",
                "self_attn.o_proj",
                "mlp.gate_proj",
                "mlp.up_proj",
                "mlp.down_proj",
            ]
        ),
    }
    model, _ = load(str(runs["base"]), adapter_path=str(result["out"]))
    assert np.abs(mlx_logits(model) - trained_logits(runs["none"])).max() < TOL


def test_quantized_residual_conversion_error_is_measured(runs):
    """With NF4 the LoRA on the original base misses Q(W_res) - W_res per adapted layer (W_res = W - s A0 B0)
    and Q(W) - W per frozen MLP layer: the report's numbers against that formula in numpy."""
    result = export(runs, "nf4", "peft", "peft_nf4_out")
    error = result["conversion_error"]
    model = load_run(runs["nf4"])[0]
    base = mx.load(str(runs["base"] / "model.safetensors"))
    init = mx.load(str(runs["nf4"] / "adapters_init.safetensors"))
    path = "model.layers.1.self_attn.v_proj"
    layer = dict(model.named_modules())[path]
    w = np.array(base[f"{path}.weight"])
    a0, b0 = np.array(init[f"{path}.lora_a"]), np.array(init[f"{path}.lora_b"])
    a, b, s = np.array(layer.lora_a), np.array(layer.lora_b), layer.scale
    lora = w + s * (a @ b - a0 @ b0).T  # what PEFT computes on the original base
    trained = np.array(layer.fuse().weight)  # dequant(residual) + s * (a @ b).T
    expected = np.linalg.norm(lora - trained) / np.linalg.norm(lora)
    adapted = error["adapted_layers"]
    assert adapted["layers"] == 8 and adapted["mean"] <= adapted["max"]
    # the worst layer is at least this one; NF4 of a 64-wide random residual loses ~5-10 % of its norm
    assert expected <= adapted["max"] + 1e-6 and 0.01 < expected < 0.2
    assert error["frozen_quantized_layers"]["layers"] == 3 * MODEL_ARGS["num_hidden_layers"]
    assert 0 < error["logits"]["max_abs_diff"] and 0 <= error["logits"]["top1_agreement"] <= 1
    card = (result["out"] / "README.md").read_text()
    assert "relative weight error, adapted layers (8)" in card and "max |diff|" in card


def test_pissa_to_lora_is_the_difference_of_products():
    rng = np.random.default_rng(0)
    a, a0 = rng.normal(size=(2, 6, 3)).astype(np.float32)
    b, b0 = rng.normal(size=(2, 3, 5)).astype(np.float32)
    a2, b2 = pissa_to_lora(*(mx.array(x) for x in (a, b, a0, b0)))
    assert a2.shape == (6, 6) and b2.shape == (6, 5)
    assert np.abs(np.array(a2 @ b2) - (a @ b - a0 @ b0)).max() < 1e-5  # fp32 products of size-3 sums


def test_plain_lora_run_exports_its_trained_factors_at_rank_r():
    model = tiny_llama()
    apply_adapters(model, targets=["q_proj"], rank=4, init="lora", residual="none")
    trained = {k: v + 0.5 for k, v in tree_flatten(model.trainable_parameters())}
    model.load_weights(list(trained.items()), strict=False)
    factors = lora_factors(model, {}, "lora")
    assert list(factors) == ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"]
    f = factors["model.layers.0.self_attn.q_proj"]
    assert f.rank == 4 and np.array_equal(
        np.array(f.lora_b), np.array(trained["model.layers.0.self_attn.q_proj.lora_b"])
    )


def test_parse_size():
    assert parse_size("5GB") == 5 * 10**9 and parse_size("500MB") == 5 * 10**8 and parse_size("2GiB") == 2 * 2**30
    assert parse_size("1.5KB") == 1500 and parse_size("123") == 123
    for bad in ("", "GB", "5 parsecs", "-1GB", "0"):
        with pytest.raises(ForgeError, match="shard-size"):
            parse_size(bad)


def test_shards_hold_every_tensor_once(tmp_path):
    weights = {f"w{i}": mx.full((10,), i, mx.float32) for i in range(7)}  # 40 bytes each
    files = write_safetensors(weights, tmp_path, shard_bytes=100)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert files[-1] == "model.safetensors.index.json" and len(files) - 1 == 4  # 2 + 2 + 2 + 1 tensors
    assert index["metadata"]["total_size"] == 280
    for key, file in index["weight_map"].items():
        assert mx.load(str(tmp_path / file))[key][0].item() == int(key[1:])


def test_tied_lm_head_and_quantization_companions_follow_the_base(tmp_path):
    """The base checkpoint keeps an lm_head that mlx-lm's sanitize dropped (tied): it comes back verbatim;
    .scales/.biases of a weight that is now dense are left out."""
    embed = mx.arange(12, dtype=mx.float32).reshape(3, 4)
    base = {
        "model.embed_tokens.weight": embed,
        "lm_head.weight": embed,
        "rotary.inv_freq": mx.ones((2,)),
        "model.embed_tokens.scales": mx.ones((3, 1)),
        "model.embed_tokens.biases": mx.ones((3, 1)),
    }
    mx.save_safetensors(str(tmp_path / "model.safetensors"), base)
    out = match_base_names({"model.embed_tokens.weight": embed * 2}, tmp_path, mx.float32, log=lambda *a: None)
    assert sorted(out) == ["lm_head.weight", "model.embed_tokens.weight", "rotary.inv_freq"]
    assert np.array_equal(np.array(out["lm_head.weight"]), np.array(embed))
    mx.save_safetensors(str(tmp_path / "model.safetensors"), {"model.embed_tokens.weight": mx.ones((4, 3))})
    with pytest.raises(ForgeError, match="shape"):
        match_base_names({"model.embed_tokens.weight": embed}, tmp_path, mx.float32)


def test_bad_inputs_are_one_line_errors(runs, tmp_path, capsys):
    empty_run = tmp_path / "no_adapters"
    empty_run.mkdir()
    for name in ("config.yaml", "adapter_config.json"):
        (empty_run / name).write_text((runs["none"] / name).read_text())
    with pytest.raises(ForgeError, match="no adapters"):
        export_run(empty_run, "hf", tmp_path / "x")
    with pytest.raises(ForgeError, match="not a forge-mlx run"):
        export_run(tmp_path, "hf", tmp_path / "x")
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("mine")
    with pytest.raises(ForgeError, match="not empty.*--force"):
        export_run(runs["none"], "mlx-lm", busy)
    assert (busy / "keep.txt").exists()
    with pytest.raises(ForgeError, match="refusing to replace"):
        export_run(runs["none"], "mlx-lm", runs["none"], force=True)
    with pytest.raises(ForgeError, match="--push-to-hub"):
        export_run(runs["none"], "mlx-lm", tmp_path / "y", dry_run=True)
    assert main(["export", str(runs["none"]), "--format", "gguf", "--out", str(tmp_path / "z")]) == 2
    assert "Invalid value for '--format'" in capsys.readouterr().err
    assert main(["export", str(empty_run), "--format", "hf", "--out", str(tmp_path / "z")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "no adapters" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "x").exists() and not (tmp_path / "z").exists()
    # --force replaces the folder wholly (no stale file survives)
    assert main(["export", str(runs["none"]), "--format", "mlx-lm", "--out", str(busy), "--force"]) == 0
    assert sorted(p.name for p in busy.iterdir()) == [
        "README.md",
        "adapter_config.json",
        "adapters.safetensors",
    ]


def test_dry_run_push_lists_files_and_stays_offline(runs, monkeypatch):
    """--dry-run lists every file with its size and opens no connection (sockets are disabled here)."""
    import huggingface_hub

    def offline(*args, **kwargs):
        raise AssertionError("the dry run touched the network")

    monkeypatch.setattr(socket.socket, "connect", offline)
    monkeypatch.setattr(huggingface_hub.HfApi, "__init__", offline)
    monkeypatch.setenv("HF_TOKEN", "hf_secret_do_not_print")
    lines = []
    result = export_run(
        runs["none"],
        "peft",
        runs["root"] / "push_out",
        push_to_hub_repo="me/tiny-pissa",
        dry_run=True,
        log=lines.append,
    )
    out = result["out"]
    expected = sorted((p.name, p.stat().st_size) for p in out.iterdir())
    assert result["uploaded"] == expected and len(expected) == 3
    assert "dry run: nothing uploaded" in lines and not any("hf_secret" in line for line in lines)
    assert any(line.strip().startswith("adapter_model.safetensors") for line in lines)
    with pytest.raises(ForgeError, match="owner/name"):
        export_run(
            runs["none"],
            "peft",
            runs["root"] / "push_bad",
            push_to_hub_repo="not a repo",
            dry_run=True,
            log=lambda *a: None,
        )


@pytest.mark.slow
def test_smollm2_nf4_run_exports(tmp_path):
    """On the real SmolLM2-135M: 2 SFT steps over NF4, then the hf export loads in transformers and matches
    the trained model; the PEFT conversion error of a real 4-bit residual is reported."""
    pytest.importorskip("torch")
    if not (ROOT / SMOL / "model.safetensors").exists():
        pytest.skip("the default model is not built (make setup)")
    from transformers import AutoModelForCausalLM

    from forge_mlx.config import load_config

    config = load_config(
        ROOT / "configs/demo.yaml",
        [
            f"model={ROOT / SMOL}",
            f"data.train={ROOT / 'data/sft'}",
            f"output_dir={tmp_path / 'run'}",
            "train.steps=2",
            "dpo.enabled=false",
            "adapter.rank=8",
            "adapter.alpha=16",
            "train.val_batches=0",
        ],
    )
    run_training(config, log=lambda *a: None)
    run = tmp_path / "run"
    hf = export_run(run, "hf", tmp_path / "hf", log=lambda *a: None)
    model = AutoModelForCausalLM.from_pretrained(str(hf["out"]), dtype="float32").eval()
    assert np.abs(torch_logits(model) - trained_logits(run)).max() < 1e-3  # 30 layers, logits ~20: fp32 sums
    error = export_run(run, "peft", tmp_path / "peft", log=print)["conversion_error"]
    assert 0 < error["adapted_layers"]["mean"] < 0.2 and error["logits"]["top1_agreement"] > 0.5
