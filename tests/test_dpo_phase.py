"""The DPO phase on the tiny model: it starts at log 2 with zero rewards (policy = reference), learns the
preference, keeps its reference log-probs across a resume, and a step runs the policy on chosen + rejected
only."""

import math
import shutil

import helpers
import mlx.core as mx
import numpy as np
import pytest

from forge_mlx import dpo, pipeline, run_files, train
from forge_mlx.adapters import load_adapter_weights
from forge_mlx.data.jsonl import load_split
from forge_mlx.data.preference import encode_preference_split
from forge_mlx.losses import sequence_logps
from forge_mlx.metrics_log import read_metrics
from forge_mlx.pipeline import run_training
from forge_mlx.runs import load_run

DPO_ONLY = ("data.train=null", "dpo.enabled=true")


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    helpers.tiny_config(root)
    return root


def pair_logps(model, tokenizer, config) -> tuple[np.ndarray, np.ndarray]:
    """Sequence log-probs of every chosen and rejected completion, one unpadded sequence at a time."""
    data = load_split(config.dpo.data, "train", kind="preference")
    pairs = encode_preference_split(data, tokenizer, max_seq_length=config.data.max_seq_length).examples
    out = np.zeros((2, len(pairs)))
    for i, pair in enumerate(pairs):
        for side, (tokens, mask) in enumerate(pair):
            out[side, i] = sequence_logps(model, mx.array([tokens]), mx.array([mask])).item()
    return out[0], out[1]


def test_dpo_starts_at_log_2_with_zero_rewards(root):
    """At step 0 the policy is the reference, so every log-ratio is 0: loss = -log sigmoid(0) = log 2 and all
    rewards are 0. The reference is computed in unshuffled eval batches and the step in shuffled ones (other
    padding, other matmul shapes): fp32 log-probs of ~-15 agree to ~1e-6, times beta 0.1, so 1e-5."""
    run_training(helpers.tiny_config(root, "start", *DPO_ONLY, "dpo.steps=1"), log=helpers.quiet)
    first = next(r for r in read_metrics(root / "start" / "metrics.jsonl") if r.get("phase") == "dpo")
    assert first["step"] == 1 and first["loss"] == pytest.approx(math.log(2), abs=1e-5)
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins"):
        assert abs(first[key]) < 1e-5, key
    assert first["logps/chosen"] < -1.0 and first["logps/rejected"] < -1.0  # real log-probs, not zeros


def test_reward_accuracy_rises(root):
    config = helpers.tiny_config(root, "learn", *DPO_ONLY, "dpo.steps=20")
    run_training(config, log=helpers.quiet)
    run = root / "learn"
    reference = helpers.load_arrays(run / dpo.REFERENCE_FILE)
    # the reference is the starting policy (here the PiSSA init), recomputed unpadded: fp32 sums of ~6
    # log-probs of ~-4 in another padding agree to ~4e-6 (measured), so 1e-4
    model, tokenizer, _, _ = load_run(run, adapters="init")
    chosen0, rejected0 = pair_logps(model, tokenizer, config)
    np.testing.assert_allclose(reference["train.chosen"], chosen0, atol=1e-4)
    np.testing.assert_allclose(reference["train.rejected"], rejected0, atol=1e-4)
    # after 20 steps, recomputed independently on all 8 pairs with the trained adapters
    model, tokenizer, _, _ = load_run(run)
    chosen, rejected = pair_logps(model, tokenizer, config)
    margins = config.dpo.beta * ((chosen - chosen0) - (rejected - rejected0))
    # measured: every pair ranked right (accuracy 1.0, margins 0.5-1.5 from 0); 7 of 8 leaves margin for noise
    assert (margins > 0).mean() >= 7 / 8 and margins.mean() > 0.3
    reports = [r for r in read_metrics(run / "metrics.jsonl") if r.get("phase") == "dpo"]
    assert np.mean([r["rewards/accuracies"] for r in reports[-5:]]) >= 0.75
    assert np.mean([r["loss"] for r in reports[-5:]]) < math.log(2) - 0.2


def test_reference_is_the_policy_after_sft(root):
    """With SFT first, the reference log-probs are those of the SFT-trained adapters, not of the init."""
    config = helpers.tiny_config(root, "sft_dpo", "train.steps=6", "dpo.enabled=true", "dpo.steps=1")
    run_training(config, log=helpers.quiet)
    run = root / "sft_dpo"
    reference = helpers.load_arrays(run / dpo.REFERENCE_FILE)
    model, tokenizer, _, _ = load_run(run, adapters="init")
    chosen0, _ = pair_logps(model, tokenizer, config)
    load_adapter_weights(model, mx.load(str(run / "checkpoints" / "sft-000006" / "adapters.safetensors")))
    chosen, rejected = pair_logps(model, tokenizer, config)
    np.testing.assert_allclose(reference["train.chosen"], chosen, atol=1e-4)
    np.testing.assert_allclose(reference["train.rejected"], rejected, atol=1e-4)
    assert np.abs(chosen - chosen0).max() > 0.1  # SFT moved the policy, so the check above has teeth


def test_resume_reuses_the_reference_log_probs(root, monkeypatch):
    extra = ("train.steps=4", "dpo.enabled=true", "dpo.steps=6", "train.save_every=2")
    run_training(helpers.tiny_config(root, "dpo_full", *extra), log=helpers.quiet)
    write = train.MetricsLog.write

    class Crash(Exception):
        pass

    def dying(self, record):
        if record.get("phase") == "dpo" and record.get("step") == 5:
            raise Crash
        write(self, record)

    with monkeypatch.context() as patch:
        patch.setattr(train.MetricsLog, "write", dying)
        with pytest.raises(Crash):
            run_training(helpers.tiny_config(root, "dpo_cut", *extra), log=helpers.quiet)
    run = root / "dpo_cut"
    digest = run_files.sha256(run / dpo.REFERENCE_FILE)
    shutil.copy(run / dpo.REFERENCE_FILE, root / "reference_before")

    def no_recompute(*args, **kwargs):
        raise AssertionError("reference log-probs recomputed on resume")

    monkeypatch.setattr(dpo, "reference_logps", no_recompute)
    log = []
    run_training(helpers.tiny_config(root, "dpo_cut", *extra), resume=True, log=log.append)
    assert "  resumed dpo from dpo-000004 (step 4)" in log
    assert run_files.sha256(run / dpo.REFERENCE_FILE) == digest
    want, got = helpers.losses(root / "dpo_full", "dpo"), helpers.losses(run, "dpo")
    assert sorted(got) == list(range(1, 7))
    assert max(abs(got[s] - want[s]) for s in want) <= 1e-5  # bit-exact replay measured; see test_resume.py
    final = helpers.load_arrays(run / "adapters.safetensors")
    assert helpers.max_abs_diff(final, helpers.load_arrays(root / "dpo_full" / "adapters.safetensors")) <= 1e-6


def test_a_dpo_step_runs_the_policy_on_chosen_and_rejected_only(root, monkeypatch):
    """Count the model body's forward calls (compilation off, so Python runs every call): the reference pass
    runs once, in eval mode, before training; each micro-batch then runs ONE training forward over its 2b rows
    (b chosen + b rejected) -- no reference model, no second pass."""
    calls = []
    load_model = pipeline.load_model

    def counting_load(*args, **kwargs):
        model, tokenizer, config = load_model(*args, **kwargs)
        for module in (model, model.model):
            cls = type(module)

            def counted(self, tokens, *a, _cls=cls, **k):
                calls.append((type(self).__name__, self.training, tuple(tokens.shape)))
                return _cls.__call__(self, tokens, *a, **k)

            module.__class__ = type(cls.__name__, (cls,), {"__call__": counted})
        return model, tokenizer, config

    monkeypatch.setattr(pipeline, "load_model", counting_load)
    steps, grad_accum, b = 3, 2, 2
    config = helpers.tiny_config(
        root, "count", *DPO_ONLY, f"dpo.steps={steps}", f"dpo.grad_accum={grad_accum}", f"dpo.batch_size={b}"
    )
    mx.disable_compile()
    try:
        run_training(config, log=helpers.quiet)
    finally:
        mx.enable_compile()
    assert all(name == "LlamaModel" for name, _, _ in calls)  # the loss runs the body + head, never Model
    reference = [shape for _, training, shape in calls if not training]
    training = [shape for _, training, shape in calls if training]
    assert calls[: len(reference)] == [("LlamaModel", False, s) for s in reference]  # the reference comes first
    assert len(reference) == len(helpers.PROMPTS) // b and all(s[0] == 2 * b for s in reference)
    assert len(training) == steps * grad_accum and all(s[0] == 2 * b for s in training)


def test_a_rank_whose_share_is_only_filler_pairs_adds_nothing(root):
    """Data parallel over 2 ranks when the epoch's last batch holds one pair: rank 1 gets only the filler pair.
    Its loss must be finite with weight 0 and zero gradients, so the ranks' weighted sums are the one-process
    batch's (before, its empty reference made the loss NaN and the whole step was skipped on every rank)."""
    import mlx.nn as nn
    from mlx.utils import tree_flatten

    from forge_mlx import phases
    from forge_mlx.data.batching import BatchStream, shard

    config = helpers.tiny_config(root, "filler", *DPO_ONLY)
    model, tokenizer = helpers.adapted_model(config)
    data = load_split(config.dpo.data, "train", kind="preference")
    pair = encode_preference_split(data, tokenizer, max_seq_length=config.data.max_seq_length).examples[:1]
    batch = next(BatchStream(pair, 2, shuffle=False))  # one real pair and one filler pair
    reference = {"chosen": np.array([-3.0], np.float32), "rejected": np.array([-5.0], np.float32)}
    loss_and_grad = nn.value_and_grad(model, dpo.dpo_loss_fn(config))

    def weighted(share):
        arrays, _ = phases.preference_rows(*pipeline.local_rows(share), reference)
        (loss, weight, _), grad = loss_and_grad(model, *(mx.array(a) for a in arrays))
        return loss.item(), weight.item(), {k: np.array(g) for k, g in tree_flatten(grad)}

    full, rank0, rank1 = weighted(batch), weighted(shard(batch, 0, 2)), weighted(shard(batch, 1, 2))
    assert rank1[1] == 0.0 and math.isfinite(rank1[0])
    assert all(not g.any() for g in rank1[2].values())  # a filler pair has no target token: exactly zero
    assert rank0[1] == full[1] == 1.0
    # the same pair through the same ops, only in a 2-row instead of a 4-row batch: fp32 round-off
    assert rank0[0] == pytest.approx(full[0], abs=1e-6)
    assert max(np.abs(rank0[2][k] - full[2][k]).max() for k in full[2]) < 1e-5
