"""Import a LoRA trained elsewhere: real PEFT and mlx-lm adapters on the tiny llama (tests/helpers.py), merged
by forge-mlx before the PiSSA init, against the reference libraries' own merge (PEFT merge_and_unload, mlx-lm
fuse); a run that starts from one; and the adapters forge-mlx refuses."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from helpers import adapted_model, quiet, tiny_config
from mlx.utils import tree_flatten, tree_unflatten

from forge_mlx.adapter_import import read_adapter, read_safetensors
from forge_mlx.errors import ForgeError
from forge_mlx.models import load_model
from forge_mlx.pipeline import adapt, run_training
from forge_mlx.run_files import run_config

torch = pytest.importorskip("torch")
pytest.importorskip("peft")

# Token ids of the tiny vocabulary (34 used of 64): two rows of a chat-like sequence.
INPUTS = [[31, 3, 1, 7, 8, 32, 1, 31], [5, 9, 12, 20, 2, 33, 33, 6]]
# fp32 throughout: forge-mlx's PiSSA-at-init model equals W + delta up to the SVD's and the matmuls' rounding
# (~1e-6 on logits of size ~1); 1e-4 leaves room for MLX vs torch BLAS order without hiding a wrong scale
# (the imported adapters move the logits by > 0.05, checked below) or a wrong transpose.
TOL = 1e-4
# forge-mlx's targets differ from the adapters' layers on purpose: merged layers need not be adapted ones.
FORGE = ("adapter.residual=none", "adapter.init=pissa", "adapter.targets=attention")
PEFT_CASES = {
    # per-layer rank and alpha (PEFT's regex-on-a-dotted-suffix patterns); down_proj is not a forge target
    "patterns": dict(
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "v_proj", "down_proj"],
        rank_pattern={"layers.1.self_attn.q_proj": 2},
        alpha_pattern={"down_proj": 3},
    ),
    # rsLoRA: scale = alpha / sqrt(r)
    "rslora": dict(r=4, lora_alpha=6, use_rslora=True, target_modules=["k_proj", "o_proj", "gate_proj"]),
}
MLX_LM_LORA = {"rank": 4, "scale": 3.0, "dropout": 0.0, "keys": ["self_attn.q_proj", "mlp.up_proj"]}


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("import")
    tiny_config(root)  # writes root/model, root/sft, root/dpo
    return root


def torch_logits(model) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor(INPUTS)).logits.float().numpy()


def mlx_logits(model) -> np.ndarray:
    return np.array(model(mx.array(INPUTS)).astype(mx.float32))


def base_logits(root: Path) -> np.ndarray:
    model, _, _ = load_model(str(root / "model"), "float32")
    return mlx_logits(model)


def write_peft(root: Path, name: str, **lora) -> tuple[Path, np.ndarray]:
    """A PEFT adapter saved by PEFT itself (lora_B randomised: at init it is zero, a no-op), and the logits of
    PEFT's merged model."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    model = get_peft_model(
        LlamaForCausalLM.from_pretrained(str(root / "model"), dtype=torch.float32), LoraConfig(**lora)
    )
    with torch.no_grad():
        for key, param in model.named_parameters():
            if "lora_B" in key:
                param.normal_(0.0, 0.05)
    out = root / name
    model.save_pretrained(str(out))
    return out, torch_logits(model.merge_and_unload().eval())


@pytest.fixture(scope="module")
def peft_adapters(root) -> dict[str, tuple[Path, np.ndarray]]:
    return {case: write_peft(root, f"peft_{case}", **lora) for case, lora in PEFT_CASES.items()}


@pytest.fixture(scope="module")
def mlx_lm_adapter(root) -> tuple[Path, np.ndarray]:
    """An mlx-lm adapter (LoRA on the last block's q_proj and up_proj, lora_b randomised) in mlx-lm's layout,
    and the logits of the model mlx-lm's own loader and fuse make from it."""
    from mlx_lm.tuner.utils import linear_to_lora_layers, load_adapters
    from mlx_lm.utils import load_model as mlx_lm_load

    model, _ = mlx_lm_load(root / "model")
    linear_to_lora_layers(model, 1, MLX_LM_LORA)
    mx.random.seed(1)
    factors = {k: v for k, v in tree_flatten(model.parameters()) if k.endswith((".lora_a", ".lora_b"))}
    factors = {k: 0.05 * mx.random.normal(v.shape) if k.endswith("lora_b") else v for k, v in factors.items()}
    out = root / "mlx_lm"
    out.mkdir()
    mx.save_safetensors(str(out / "adapters.safetensors"), factors, metadata={"format": "mlx"})
    config = {"fine_tune_type": "lora", "num_layers": 1, "lora_parameters": MLX_LM_LORA}
    (out / "adapter_config.json").write_text(json.dumps(config), encoding="utf-8")

    reference, _ = mlx_lm_load(root / "model")
    load_adapters(reference, str(out))
    reference.update_modules(
        tree_unflatten([(n, m.fuse()) for n, m in reference.named_modules() if hasattr(m, "fuse")])
    )
    return out, mlx_logits(reference)


def forge_logits(root: Path, adapter: Path) -> np.ndarray:
    model, _ = adapted_model(tiny_config(root, "unused", *FORGE, f"adapter.import_adapter={adapter}"))
    return mlx_logits(model)


@pytest.mark.parametrize("case", PEFT_CASES)
def test_peft_import_equals_peft_merged_model(root, peft_adapters, case):
    adapter, expected = peft_adapters[case]
    assert np.abs(expected - base_logits(root)).max() > 500 * TOL  # the adapter does change the model
    assert np.abs(forge_logits(root, adapter) - expected).max() < TOL


def test_peft_scales_follow_the_config(peft_adapters):
    layers = read_adapter(peft_adapters["patterns"][0]).layers
    assert layers["model.layers.1.self_attn.q_proj"].scale == 8 / 2  # rank_pattern: r 2, alpha 8
    assert layers["model.layers.0.self_attn.q_proj"].scale == 8 / 4
    assert layers["model.layers.0.mlp.down_proj"].scale == 3 / 4  # alpha_pattern: alpha 3, r 4
    assert layers["model.layers.1.self_attn.q_proj"].lora_a.shape == (64, 2)  # (in, r)
    rslora = read_adapter(peft_adapters["rslora"][0]).layers
    assert {d.scale for d in rslora.values()} == {6 / 2.0}  # alpha / sqrt(4)
    assert len(rslora) == 6  # 3 module names x 2 blocks


def test_mlx_lm_import_equals_mlx_lm_fused_model(root, mlx_lm_adapter):
    adapter, expected = mlx_lm_adapter
    assert np.abs(expected - base_logits(root)).max() > 500 * TOL
    imported = read_adapter(adapter)
    assert imported.kind == "mlx-lm"
    assert sorted(imported.layers) == ["model.layers.1.mlp.up_proj", "model.layers.1.self_attn.q_proj"]
    assert np.abs(forge_logits(root, adapter) - expected).max() < TOL


@pytest.mark.parametrize("source", ["peft", "mlx-lm"])
def test_torch_backend_import_equals_reference(root, peft_adapters, mlx_lm_adapter, source):
    from forge_mlx.torch_backend.pipeline import adapt as torch_adapt
    from forge_mlx.torch_backend.pipeline import load_model as torch_load

    adapter, expected = peft_adapters["patterns"] if source == "peft" else mlx_lm_adapter
    config = tiny_config(root, "unused", *FORGE, f"adapter.import_adapter={adapter}")
    model, _, _, device = torch_load(config.model, "float32", torch.device("cpu"))
    report = torch_adapt(model, config, device, quiet)
    assert report["imported_layers_merged"] == len(read_adapter(adapter).layers)
    assert np.abs(torch_logits(model.eval()) - expected).max() < TOL


def test_bfloat16_tensors_widen_exactly(tmp_path):
    from safetensors.torch import save_file

    values = torch.randn(3, 5).to(torch.bfloat16)
    save_file({"x": values, "y": values.half()}, str(tmp_path / "t.safetensors"))
    read = read_safetensors(tmp_path / "t.safetensors")
    assert np.array_equal(read["x"], values.float().numpy())  # bf16 -> fp32 is exact: the bits shift left
    assert np.array_equal(read["y"], values.half().float().numpy())


def test_run_starts_from_an_imported_adapter(root, peft_adapters):
    adapter, _ = peft_adapters["patterns"]
    config = tiny_config(root, "run", f"adapter.import_adapter={adapter}", "train.steps=2", "dpo.enabled=false")
    lines = []
    summary = run_training(config, log=lambda *a: lines.append(" ".join(map(str, a))))
    assert summary["sft"]["steps"] == 2 and np.isfinite(summary["sft"]["final_loss"])
    assert any("merged 6 layers of the peft adapter" in line for line in lines)  # q, v, down x 2 blocks
    assert run_config(root / "run").adapter.import_adapter == str(adapter)  # load_run merges it again


# ---- what is refused -------------------------------------------------------------------------------------


def copy_adapter(source: Path, out: Path, config_change: dict | None = None) -> Path:
    shutil.copytree(source, out)
    if config_change:
        config = json.loads((out / "adapter_config.json").read_text())
        (out / "adapter_config.json").write_text(json.dumps({**config, **config_change}))
    return out


def test_dora_is_refused(root, peft_adapters, mlx_lm_adapter, tmp_path):
    peft_dora, _ = write_peft(root, "peft_dora", r=2, lora_alpha=4, use_dora=True, target_modules=["q_proj"])
    with pytest.raises(ForgeError, match="'use_dora' is set"):
        read_adapter(peft_dora)
    mlx_dora = copy_adapter(mlx_lm_adapter[0], tmp_path / "mlx_dora", {"fine_tune_type": "dora"})
    with pytest.raises(ForgeError, match="fine_tune_type 'dora'"):
        read_adapter(mlx_dora)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"peft_type": "IA3"}, "peft_type 'IA3' is not LoRA"),
        ({"init_lora_weights": "pissa_niter_4"}, "rewrote the base weights"),
        ({"bias": "all"}, "trains biases"),
    ],
)
def test_peft_configs_that_do_not_merge_are_refused(peft_adapters, tmp_path, change, message):
    adapter = copy_adapter(peft_adapters["patterns"][0], tmp_path / "a", change)
    with pytest.raises(ForgeError, match=message):
        read_adapter(adapter)


def test_pickled_adapter_is_refused_unread(peft_adapters, tmp_path):
    adapter = copy_adapter(peft_adapters["patterns"][0], tmp_path / "a")
    (adapter / "adapter_model.safetensors").unlink()
    (adapter / "adapter_model.bin").write_bytes(b"not even a pickle: it must not be opened")
    for path in (adapter, adapter / "adapter_model.bin"):
        with pytest.raises(ForgeError, match="pickled; forge-mlx never unpickles") as info:
            read_adapter(path)
        assert "adapter_model.bin" in str(info.value)


def test_unknown_layer_is_named(root, mlx_lm_adapter, tmp_path):
    adapter = copy_adapter(mlx_lm_adapter[0], tmp_path / "a")
    weights = mx.load(str(adapter / "adapters.safetensors"))
    mx.save_safetensors(
        str(adapter / "adapters.safetensors"), {k.replace("layers.1", "layers.7"): v for k, v in weights.items()}
    )
    model, _, _ = load_model(str(root / "model"), "float32")
    config = tiny_config(root, "unused", *FORGE, f"adapter.import_adapter={adapter}")
    with pytest.raises(ForgeError, match=r"'model\.layers\.7\.mlp\.up_proj\.lora_a' is for 'model\.layers\.7\.mlp"):
        adapt(model, config, quiet)


def test_non_factor_tensor_is_named(peft_adapters, tmp_path):
    from safetensors.numpy import load_file, save_file

    adapter = copy_adapter(peft_adapters["patterns"][0], tmp_path / "a")
    file = adapter / "adapter_model.safetensors"
    save_file({**load_file(str(file)), "base_model.model.lm_head.weight": np.zeros((64, 64), np.float32)}, str(file))
    with pytest.raises(ForgeError, match="'base_model.model.lm_head.weight' is not a LoRA factor"):
        read_adapter(adapter)


def test_export_refuses_adapter_formats_for_a_run_that_imported_an_adapter(tmp_path):
    """The PEFT / mlx-lm formats are relative to the original base, which lacks the merged import: refuse them."""
    from forge_mlx.config import save_config
    from forge_mlx.errors import ForgeError
    from forge_mlx.export import export_run

    run = tmp_path / "run"
    run.mkdir()
    config = tiny_config(tmp_path, "run", f"adapter.import_adapter={tmp_path / 'somewhere'}")
    save_config(config, run / "config.yaml")
    for fmt in ("peft", "mlx-lm"):
        with pytest.raises(ForgeError, match="--format hf"):
            export_run(run, fmt, tmp_path / f"out-{fmt}")
