"""Evaluation measures against hand counts and numpy, scoring on a tiny random llama, and the report files."""

import json
import math
from pathlib import Path

import helpers
import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.models import llama
from mlx_lm.tokenizer_utils import TokenizerWrapper

from forge_mlx.config import Config, save_config
from forge_mlx.data import Dataset, PreferencePair, encode_sft
from forge_mlx.data.jsonl import validate_row
from forge_mlx.dpo import reference_logps
from forge_mlx.errors import ForgeError
from forge_mlx.evaluate import (
    completion_loss,
    exact_match,
    extract,
    format_table,
    matches,
    perplexity,
    preference_accuracy,
    preference_scores,
    reward_margins,
    suite,
    write_report,
)
from forge_mlx.evaluate.generate import generation_prompt, greedy_replies
from forge_mlx.evaluate.suite import EvalOptions, candidates, chosen_measures, completion_nll, score_model

VOCAB = 97
SMOL = Path("/work/main/models/SmolLM2-135M-Instruct")
WORDS = "user assistant system answer what is one two three four red blue sky grass paris rome".split()


def tiny_llama(seed: int = 0) -> llama.Model:
    model = helpers.tiny_llama(seed, hidden_size=32, intermediate_size=64, vocab_size=VOCAB)
    model.eval()
    return model


def tiny_tokenizer() -> TokenizerWrapper:
    """Word-level ChatML tokenizer (ids < 25 < VOCAB), wrapped as mlx-lm loads tokenizers."""
    return TokenizerWrapper(helpers.tiny_tokenizer(WORDS))


def dataset(rows: list[dict]) -> Dataset:
    records = [validate_row(r, source="eval.jsonl", line=i) for i, r in enumerate(rows, 1)]
    return Dataset(path=Path("eval.jsonl"), fmt=records[0].fmt, records=records, skipped=[])


def chat(question: str, answer: str) -> dict:
    return {
        "system": "answer",
        "messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}],
    }


SFT_ROWS = [
    chat("what is one", "one"),
    chat("what is sky", "blue sky"),
    chat("what is grass", "grass"),
    chat("what is paris", "paris is red"),
]
COMPLETION = {"prompt": "what is paris", "completion": "paris is red"}
PAIRS = [
    {"prompt": "what is sky", "chosen": "blue", "rejected": "red"},
    {"prompt": "what is one", "chosen": "one", "rejected": "two three"},
    {"prompt": "what is rome", "chosen": "rome", "rejected": "paris"},
]


def numpy_logps(model: llama.Model, tokens: list[int]) -> np.ndarray:
    """(T-1,) log p(tokens[1:] | prefix) of ONE unpadded sequence, log-softmax in float64."""
    logits = np.array(model(mx.array([tokens[:-1]])), dtype=np.float64)[0]  # (T-1, V)
    shifted = logits - logits.max(-1, keepdims=True)
    logp = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    return logp[np.arange(len(tokens) - 1), tokens[1:]]


# ------------------------------------------------------------------------------------------- pure measures


def test_completion_loss_weights_batches_by_tokens():
    # batch means 1.0 over 1 token and 3.0 over 3 tokens: (1*1 + 3*3) / 4, not (1 + 3) / 2
    assert completion_loss([1.0, 3.0], [1, 3]) == 2.5
    assert perplexity(2.5) == math.exp(2.5)
    assert perplexity(1e4) == math.inf
    with pytest.raises(ForgeError, match="no supervised tokens"):
        completion_loss([0.0], [0])


@pytest.mark.parametrize(
    ("extractor", "prediction", "reference", "hit"),
    [
        ("exact", "  Paris. ", "paris", True),
        ("exact", "PARIS", "Paris.", True),
        ("exact", "The capital is Paris.", "Paris", False),
        ("exact", "new   york", "New York", True),
        ("last-number", "28 + 26 = 54", "54", True),
        ("last-number", "It costs 1,000 dollars.", "1000", True),
        ("last-number", "3.50", "3.5", True),
        ("last-number", "-7 degrees", "-7", True),
        ("last-number", "54 then 55", "54", False),
        ("last-number", "no number here", "54", False),
        ("first-line", "\nRome\nbecause it is", "rome", True),
        ("first-line", "Rome is the capital\nRome", "rome", False),
        ("first-line", "   \n  ", "rome", False),
    ],
)
def test_extractors_on_hand_made_pairs(extractor, prediction, reference, hit):
    assert matches([prediction], [reference], extractor) == [hit]


def test_exact_match_counts_hits_and_rejects_unknown_extractors():
    predictions = ["Paris.", "rome", "Berlin is the capital", "madrid"]
    references = ["paris", "Rome", "Berlin", "Lisbon"]
    assert exact_match(predictions, references) == 0.5  # 2 of 4 by hand
    assert extract("Answer: 12 and 13", "last-number") == "13"
    with pytest.raises(ForgeError, match="unknown extractor"):
        exact_match(["a"], ["a"], "fuzzy")


def test_preference_scores_by_hand():
    chosen = np.array([-1.0, -5.0, -2.0, -3.0])
    rejected = np.array([-2.0, -4.0, -2.0, -9.0])
    assert preference_accuracy(chosen, rejected) == 0.5  # pairs 0 and 3 win; the tie (pair 2) counts as wrong
    ref_c, ref_r = np.array([-1.0, -6.0, -1.0, -3.0]), np.array([-1.0, -4.0, -3.0, -8.0])
    # beta * ((pc - rc) - (pr - rr)) by hand: .5*(0+1), .5*(1-0), .5*(-1-1), .5*(0+1)
    np.testing.assert_allclose(reward_margins(chosen, rejected, ref_c, ref_r, 0.5), [0.5, 0.5, -1.0, 0.5])
    scores = preference_scores(chosen, rejected, ref_c, ref_r, beta=0.5)
    assert scores == {
        "preference_accuracy": 0.5,
        "logp_margin": 1.5,
        "reward_accuracy": 0.75,
        "reward_margin": 0.125,
    }
    assert set(preference_scores(chosen, rejected)) == {"preference_accuracy", "logp_margin"}


# ----------------------------------------------------------------------------------- scoring on a tiny model


def test_perplexity_is_exp_of_the_numpy_completion_loss():
    model, rng = tiny_llama(), np.random.default_rng(0)
    examples = []
    for n, start in [(9, 4), (5, 2), (12, 7), (7, 1), (6, 5)]:  # lengths differ, so batches are padded
        tokens = rng.integers(0, VOCAB, n).tolist()
        examples.append((tokens, [False] * start + [True] * (n - start)))
    loss, n_tokens = completion_nll(model, examples, batch_size=2, pad_id=0)
    nll = [-numpy_logps(model, t)[np.array(m[1:])] for t, m in examples]
    expected = np.concatenate(nll).mean()  # every supervised token once, no padding
    assert n_tokens == sum(len(x) for x in nll) == 5 + 3 + 5 + 6 + 1
    # fp32 forward + fp32 log-softmax vs float64 on O(1) logits: ~1e-6 error; 1e-5 relative leaves margin
    assert loss == pytest.approx(expected, rel=1e-5)
    assert perplexity(loss) == pytest.approx(math.exp(expected), rel=1e-5)


def test_preference_accuracy_on_a_model_that_prefers_its_own_greedy_reply():
    """A greedy continuation beats an always-least-likely one: each step's max prob >= 1/V >= its min prob."""
    model, pairs, expected = tiny_llama(), [], []
    for seed in range(6):
        prompt = np.random.default_rng(seed).integers(0, VOCAB, 5).tolist()
        greedy, worst = list(prompt), list(prompt)
        for _ in range(4):
            greedy.append(int(mx.argmax(model(mx.array([greedy]))[0, -1])))
            worst.append(int(mx.argmin(model(mx.array([worst]))[0, -1])))
        mask = [False] * 5 + [True] * 4
        swap = seed % 3 == 0  # pairs 0 and 3 list the disliked reply as "chosen"
        pairs.append(
            PreferencePair((worst, mask), (greedy, mask)) if swap else PreferencePair((greedy, mask), (worst, mask))
        )
        expected.append(not swap)
    logps = reference_logps(model, pairs, 4, False, 0)
    for i, pair in enumerate(pairs):  # summed completion log-probs, checked against numpy (1e-4: 4 fp32 terms)
        for side, key in zip(pair, ("chosen", "rejected"), strict=True):
            assert logps[key][i] == pytest.approx(numpy_logps(model, side[0])[-4:].sum(), abs=1e-4)
    assert list(logps["chosen"] > logps["rejected"]) == expected
    assert preference_accuracy(logps["chosen"], logps["rejected"]) == pytest.approx(4 / 6)


def test_generation_prompt_is_the_sft_encodings_unsupervised_prefix():
    tok = tiny_tokenizer()
    for row in [*dataset(SFT_ROWS).records, *dataset([COMPLETION]).records]:
        prompt = generation_prompt(row, tok)
        tokens, mask = encode_sft(row, tok)
        assert prompt.tokens == tokens[: mask.index(True)]
    raw = dataset([COMPLETION]).records[0]  # without the template: the raw prompt, as SFT encodes it
    tokens, mask = encode_sft(raw, tok, use_chat_template=False)
    assert generation_prompt(raw, tok, use_chat_template=False).tokens == tokens[: mask.index(True)]
    assert generation_prompt(dataset(SFT_ROWS).records[1], tok).reference == "blue sky"
    with pytest.raises(ForgeError, match="no reference answer"):
        generation_prompt(dataset([{"text": "red sky"}]).records[0], tok)


def test_batched_greedy_equals_one_at_a_time():
    model, tok = tiny_llama(), tiny_tokenizer()
    prompts = [generation_prompt(r, tok).tokens for r in dataset(SFT_ROWS).records]
    batched = greedy_replies(model, tok, prompts, max_tokens=5, batch_size=3)
    assert batched == greedy_replies(model, tok, prompts, max_tokens=5, batched=False)
    assert all(batched)  # a random model with a 97-token vocabulary rarely picks EOS first


def test_score_model_matches_independent_computations():
    model, tok = tiny_llama(), tiny_tokenizer()
    data = {"sft": dataset(SFT_ROWS), "preference": dataset(PAIRS)}
    scores = score_model(
        model,
        tok,
        data,
        ("loss", "generate", "preference"),
        Config(),
        EvalOptions(max_tokens=3, batch_size=2),
    )
    nll = [-numpy_logps(model, t)[np.array(m[1:])] for t, m in (encode_sft(r, tok) for r in data["sft"].records)]
    assert scores["values"]["loss"] == pytest.approx(np.concatenate(nll).mean(), rel=1e-5)  # as above
    replies = [g["reply"] for g in scores["generations"]]
    assert scores["values"]["exact_match"] == exact_match(replies, ["one", "blue sky", "grass", "paris is red"])
    assert scores["logps"]["chosen"].shape == (3,)


def test_run_eval_writes_the_table_with_rewards_against_the_first_column(tmp_path, monkeypatch):
    tok = tiny_tokenizer()
    monkeypatch.setattr(suite, "load_candidate", lambda c, dtype, log: (tiny_llama(int(c.model[-1])), tok))
    (tmp_path / "sft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in SFT_ROWS))
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in PAIRS))
    report, paths = suite.run_eval(
        "tiny0",
        (str(tmp_path / "sft.jsonl"), str(tmp_path / "pairs.jsonl")),
        compare=("tiny1",),
        options=EvalOptions(max_tokens=2),
        out=tmp_path / "out" / "r.json",
        log=lambda *a: None,
    )
    assert [m["label"] for m in report["models"]] == ["base", "tiny1"]
    rows = report["measures"]
    assert list(rows) == [
        "loss",
        "perplexity",
        "exact_match",
        "preference_accuracy",
        "logp_margin",
        "reward_accuracy",
        "reward_margin",
    ]
    assert rows["perplexity"]["tiny1"] == pytest.approx(math.exp(rows["loss"]["tiny1"]))
    assert rows["reward_accuracy"]["base"] is None  # the base is the reference: no reward for itself
    base, other = tiny_llama(0), tiny_llama(1)
    pairs = [
        PreferencePair(
            *(
                encode_sft(validate_row({"prompt": p["prompt"], "completion": p[k]}, source="x", line=1), tok)
                for k in ("chosen", "rejected")
            )
        )
        for p in PAIRS
    ]
    ref, pol = reference_logps(base, pairs, 4, False, 0), reference_logps(other, pairs, 4, False, 0)
    margins = reward_margins(pol["chosen"], pol["rejected"], ref["chosen"], ref["rejected"], Config().dpo.beta)
    assert rows["reward_accuracy"]["tiny1"] == pytest.approx(np.mean(margins > 0))
    assert rows["reward_margin"]["tiny1"] == pytest.approx(np.mean(margins), abs=1e-6)
    assert set(paths) == {"json", "markdown", "png"}
    assert json.loads(paths["json"].read_text())["measures"] == rows
    assert format_table(report) in paths["markdown"].read_text()
    assert paths["png"].read_bytes()[:4] == b"\x89PNG"


# ----------------------------------------------------------------------------------- columns, data, report


def test_columns_for_a_run_a_model_with_adapters_and_comparisons(tmp_path):
    run = tmp_path / "run1"
    run.mkdir()
    save_config(Config(model="org/base"), run / "config.yaml")
    assert [(c.label, c.model, c.run) for c in candidates(str(run), compare=("org/other", str(run)))] == [
        ("base", "org/base", None),
        ("tuned", "org/base", str(run)),
        ("other", "org/other", None),
        ("run1", "org/base", str(run)),
    ]
    assert [c.label for c in candidates("org/base", adapter=str(run))] == ["base", "tuned"]
    with pytest.raises(ForgeError, match="trained over org/base"):
        candidates("org/else", adapter=str(run))
    with pytest.raises(ForgeError, match="--adapter goes with a base model"):
        candidates(str(run), adapter=str(run))
    assert [(c.label, c.run, c.adapters) for c in candidates(str(run), with_init=True)] == [
        ("base", None, "trained"),
        ("init", str(run), "init"),
        ("tuned", str(run), "trained"),
    ]
    assert [c.label for c in candidates("org/base", adapter=str(run), with_init=True)] == ["base", "init", "tuned"]
    with pytest.raises(ForgeError, match="--with-init needs a run"):
        candidates("org/base", with_init=True)


@pytest.mark.parametrize("residual", ["none", "nf4"])
def test_the_init_column_is_the_base_up_to_the_residuals_quantization(tmp_path, residual):
    """PiSSA init reconstructs W exactly (fp32 round-off), so with residual none the init column scores as the
    base; over NF4 it carries the quantization error alone; training then moves the tuned column."""
    import helpers

    from forge_mlx.pipeline import run_training

    config = helpers.tiny_config(tmp_path, "run", f"adapter.residual={residual}", "train.steps=20")
    run_training(config, log=helpers.quiet)
    report, _ = suite.run_eval(
        config.output_dir,
        (str(tmp_path / "sft"),),
        with_init=True,
        options=EvalOptions(measures=("loss",), split="train"),
        out=tmp_path / "report.json",
        log=lambda *a: None,
    )
    loss = report["measures"]["loss"]
    assert list(loss) == ["base", "init", "tuned"]
    if residual == "none":  # the same function up to fp32 round-off in W_res + scale * A B (losses ~4)
        assert loss["init"] == pytest.approx(loss["base"], abs=1e-4)
    else:  # the 4-bit residual moves it, by less than training does
        assert abs(loss["init"] - loss["base"]) > 1e-4
    assert loss["base"] - loss["tuned"] > 10 * abs(loss["init"] - loss["base"])


def test_measures_follow_the_data_given():
    sft_only = {"sft": dataset(SFT_ROWS)}
    assert chosen_measures(None, sft_only) == ("loss", "generate")
    assert chosen_measures(None, {"preference": dataset(PAIRS)}) == ("preference",)
    with pytest.raises(ForgeError, match="needs prompt/chosen/rejected data"):
        chosen_measures(("preference",), sft_only)
    with pytest.raises(ForgeError, match="unknown measure 'bleu'"):
        chosen_measures(("bleu",), sft_only)


def test_report_writers_hold_the_numbers(tmp_path):
    report = {
        "models": [{"label": "base", "description": "m"}, {"label": "tuned", "description": "m + run"}],
        "measures": {
            "loss": {"base": 2.0, "tuned": 1.5},
            "exact_match": {"base": 0.25, "tuned": 0.5},
            "reward_accuracy": {"base": None, "tuned": 0.75},
        },
        "notes": {"loss": "4 examples"},
    }
    paths = write_report(report, tmp_path / "eval_report.json")
    assert json.loads(paths["json"].read_text())["measures"]["loss"] == {"base": 2.0, "tuned": 1.5}
    markdown = paths["markdown"].read_text()
    assert "| exact match | 0.25 | 0.5 | 0.25 |" in markdown  # last column: tuned - base
    assert "| DPO reward accuracy (vs first column) | n/a | 0.75 | n/a |" in markdown
    assert "- loss: 4 examples" in markdown
    assert paths["png"].stat().st_size > 1000


@pytest.mark.slow
@pytest.mark.skipif(not SMOL.is_dir(), reason="SmolLM2-135M-Instruct not downloaded")
def test_smollm2_answers_paris_batched_as_unbatched():
    from forge_mlx.models import load_model

    model, tok, _ = load_model(str(SMOL), "float32")
    rows = dataset(
        [
            {
                "messages": [
                    {"role": "user", "content": f"What is the capital of {country}?"},
                    {"role": "assistant", "content": city},
                ]
            }
            for country, city in (("France", "Paris"), ("Italy", "Rome"))
        ]
    )
    prompts = [generation_prompt(r, tok).tokens for r in rows.records]
    batched = greedy_replies(model, tok, prompts, max_tokens=12, batch_size=2)
    assert "Paris" in batched[0]
    assert batched == greedy_replies(model, tok, prompts, max_tokens=12, batched=False)
