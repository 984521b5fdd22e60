"""Shared fixtures: a tiny random llama (also saved as a Hugging Face folder) with a word-level ChatML tokenizer,
tiny SFT and preference jsonl files, configs that train in seconds, and a one-call train_loop."""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten
from mlx_lm.models import llama
from tokenizers import Regex, Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from forge_mlx.adapters import adapter_weights
from forge_mlx.config import Config, load_config
from forge_mlx.data.jsonl import load_split
from forge_mlx.data.sft import encode_sft_split
from forge_mlx.metrics_log import read_metrics
from forge_mlx.models import load_model
from forge_mlx.pipeline import adapt
from forge_mlx.train import LoopResult, LoopSpec, train_loop

CHATML = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
WORDS = (
    "user assistant system you are kind hello there how fine thanks bye good bad why "
    "red green blue cat dog sun moon tree fish one two three four"
).split()
VOCAB = 64  # model rows: [UNK], newline, 28 words and 3 specials use ids 0-32; the rest are never seen
MODEL_ARGS = dict(
    model_type="llama",
    hidden_size=64,
    num_hidden_layers=2,
    intermediate_size=128,
    num_attention_heads=4,
    num_key_value_heads=2,
    rms_norm_eps=1e-5,
    vocab_size=VOCAB,
    tie_word_embeddings=False,
)
# 8 prompts, each with a fixed answer of 2-4 words the random model cannot guess: the task to memorise.
PROMPTS = [
    "hello there",
    "how are you",
    "why red",
    "good cat",
    "bad dog",
    "blue sun",
    "green tree",
    "one fish",
]
ANSWERS = [
    "moon two",
    "fish four three",
    "kind",
    "tree one bye",
    "sun",
    "three cat dog two",
    "red",
    "thanks blue",
]
WRONG = ["bye bad", "green", "dog dog fish", "why", "how moon", "four", "cat sun", "two"]


def tiny_tokenizer(words: list[str] = WORDS, chat_template: str | None = CHATML) -> PreTrainedTokenizerFast:
    """Word-level: every word and every newline is one token, so spans can be counted by hand ([UNK] is 0, the
    newline 1, the words from 2, then the three specials)."""
    vocab = {w: i for i, w in enumerate(["[UNK]", "\n", *words])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"\n|[^\s]+"), behavior="removed", invert=True)
    tok.add_special_tokens(["<|im_start|>", "<|im_end|>", "<|pad|>"])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|pad|>",
        unk_token="[UNK]",
        chat_template=chat_template,
    )


def tiny_llama(seed: int = 0, **changes) -> llama.Model:
    """A random llama of MODEL_ARGS with `changes` (e.g. hidden_size, vocab_size), its parameters evaluated."""
    mx.random.seed(seed)
    model = llama.Model(llama.ModelArgs(**{**MODEL_ARGS, **changes}))
    mx.eval(model.parameters())
    return model


def write_tiny_model(folder: Path, seed: int = 0) -> Path:
    """An HF-layout folder (config.json, model.safetensors, tokenizer files) that models.load_model reads."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = tiny_tokenizer()
    tokenizer.save_pretrained(str(folder))
    config = {
        **MODEL_ARGS,
        "architectures": ["LlamaForCausalLM"],
        "eos_token_id": tokenizer.eos_token_id,
        "torch_dtype": "float32",
    }
    (folder / "config.json").write_text(json.dumps(config), encoding="utf-8")
    mx.save_safetensors(str(folder / "model.safetensors"), dict(tree_flatten(tiny_llama(seed).parameters())))
    return folder


def _chat(prompt: str, answer: str) -> dict:
    return {"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]}


def write_sft_data(folder: Path) -> Path:
    """train.jsonl = the 8 prompt/answer pairs; valid.jsonl = the first 4 (held-out data is not the point)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rows = [json.dumps(_chat(p, a)) for p, a in zip(PROMPTS, ANSWERS, strict=True)]
    (folder / "train.jsonl").write_text("\n".join(rows) + "\n", encoding="utf-8")
    (folder / "valid.jsonl").write_text("\n".join(rows[:4]) + "\n", encoding="utf-8")
    return folder


def write_preference_data(folder: Path) -> Path:
    """Chat-form pairs: the memorised answer is chosen, a wrong one rejected."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rows = [
        json.dumps(
            {
                "prompt": [{"role": "user", "content": p}],
                "chosen": [{"role": "assistant", "content": a}],
                "rejected": [{"role": "assistant", "content": w}],
            }
        )
        for p, a, w in zip(PROMPTS, ANSWERS, WRONG, strict=True)
    ]
    (folder / "train.jsonl").write_text("\n".join(rows) + "\n", encoding="utf-8")
    return folder


def tiny_config(root: Path, out: str = "run", *extra: str) -> Config:
    """Rank-4 PiSSA on every linear layer over an NF4 residual, on the tiny model; `extra` are --set's."""
    root = Path(root)
    model = root / "model"
    if not (model / "model.safetensors").exists():
        write_tiny_model(model)
        write_sft_data(root / "sft")
        write_preference_data(root / "dpo")
    overrides = [
        f"model={model}",
        f"output_dir={root / out}",
        "seed=0",
        "dtype=float32",
        "adapter.rank=4",
        "adapter.alpha=8",
        "adapter.init=pissa",
        "adapter.residual=nf4",
        "adapter.targets=all-linear",
        f"data.train={root / 'sft'}",
        "data.max_seq_length=64",
        "train.steps=30",
        "train.batch_size=4",
        "train.grad_accum=1",
        "train.lr=3e-3",
        "train.warmup_steps=0",
        "train.min_lr_ratio=1.0",
        "train.steps_per_report=1",
        "train.steps_per_eval=1000",
        "train.val_batches=0",
        "train.save_every=1000",
        "train.grad_checkpoint=false",
        f"dpo.data={root / 'dpo'}",
        "dpo.batch_size=2",
        "dpo.grad_accum=2",
        "dpo.lr=3e-3",
        "dpo.warmup_steps=0",
        "dpo.steps=10",
        *extra,
    ]
    return load_config(None, overrides)


def losses(run_dir: Path, phase: str = "sft", key: str = "loss") -> dict[int, float]:
    """step -> metric from metrics.jsonl; a step logged twice (before a crash, after resume): the last."""
    return {
        r["step"]: r[key] for r in read_metrics(Path(run_dir) / "metrics.jsonl") if r.get("phase") == phase and key in r
    }


def load_arrays(path: Path) -> dict[str, np.ndarray]:
    return {k: np.array(v) for k, v in mx.load(str(path)).items()}


def max_abs_diff(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> float:
    assert a.keys() == b.keys()
    return max(float(np.abs(a[k] - b[k]).max()) for k in a)


def quiet(*args) -> None:
    """A log function that drops run_training's progress lines."""


def adapted_model(config: Config):
    """(model, tokenizer) as run_training builds them: loaded, PiSSA-adapted, only the adapters trainable."""
    model, tokenizer, _ = load_model(config.model, config.dtype)
    adapt(model, config, quiet)
    return model, tokenizer


def sft_examples(config: Config, tokenizer) -> list:
    """The 8 training examples encoded as the pipeline encodes them (prompt masked)."""
    data = load_split(config.data.train, "train", kind="sft")
    return encode_sft_split(data, tokenizer, max_seq_length=config.data.max_seq_length).examples


def pad_rows(examples: list, pad_id: int, length: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(tokens (n, T) int32, loss_mask (n, T) bool), right-padded to `length` (default: the longest row)."""
    length = length or max(len(t) for t, _ in examples)
    tokens = np.full((len(examples), length), pad_id, np.int32)
    mask = np.zeros((len(examples), length), bool)
    for i, (t, m) in enumerate(examples):
        tokens[i, : len(t)], mask[i, : len(m)] = t, m
    return tokens, mask


def run_loop(model, optimizer, loss_fn, batches, run_dir: Path, **spec) -> LoopResult:
    """train_loop into a new `run_dir` with a test LoopSpec (SFT, one step, a report and a checkpoint every step,
    no clipping, no validation); `spec` changes its fields."""
    Path(run_dir).mkdir()
    fields = dict(
        steps=1,
        grad_accum=1,
        max_grad_norm=0.0,
        steps_per_report=1,
        steps_per_eval=1000,
        save_every=1,
        max_bad_steps=1,
        val_batches=0,
    )
    return train_loop(
        model,
        optimizer,
        loss_fn,
        batches,
        LoopSpec("sft", **{**fields, **spec}),
        run_dir,
        adapter_weights=lambda: adapter_weights(model),
        data_state=dict,
    )
