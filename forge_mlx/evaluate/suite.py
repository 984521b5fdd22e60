"""`forge-mlx eval`: a base model and tuned runs scored side by side on held-out data, one model at a time."""

from __future__ import annotations

import dataclasses
import gc
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from forge_mlx.config import Config
from forge_mlx.data.batching import eval_batches
from forge_mlx.data.jsonl import Dataset, load_split
from forge_mlx.data.preference import encode_preference_split
from forge_mlx.data.sft import encode_sft_split
from forge_mlx.dpo import reference_logps
from forge_mlx.errors import ForgeError
from forge_mlx.evaluate.generate import generation_prompts, greedy_replies
from forge_mlx.evaluate.measures import EXTRACTORS, completion_loss, matches, perplexity, preference_scores
from forge_mlx.losses import sft_loss
from forge_mlx.models import load_model
from forge_mlx.pipeline import sft_arrays
from forge_mlx.run_files import RESOLVED_CONFIG
from forge_mlx.runs import load_run, run_config

MEASURES = {"loss": "sft", "generate": "sft", "preference": "preference"}  # measure -> the data kind it needs
ROWS = (
    "loss",
    "perplexity",
    "exact_match",
    "preference_accuracy",
    "logp_margin",
    "reward_accuracy",
    "reward_margin",
)
REPORT_NAME = "eval_report.json"


@dataclass(frozen=True)
class Candidate:
    """One column: a base model, or a run's trained adapters over the base it was trained from."""

    label: str
    model: str  # folder or hub id
    run: str | None = None  # run directory whose adapters are loaded (forge_mlx.runs.load_run)
    adapters: str = "trained"  # or "init": the run's untrained PiSSA start over its (quantized) residual

    @property
    def description(self) -> str:
        if not self.run:
            return f"{self.model} (no adapters)"
        if self.adapters == "init":
            return f"{self.run} (untrained PiSSA init over {self.model}: the residual's quantization alone)"
        return f"{self.run} (trained adapters over {self.model})"


@dataclass(frozen=True)
class EvalOptions:
    measures: tuple[str, ...] | None = None  # None: every measure the data supports
    extractor: str = "exact"
    max_tokens: int = 32
    batch_size: int = 8
    limit: int | None = None
    split: str = "test"


def is_run_dir(path: str | Path) -> bool:
    return (Path(path) / RESOLVED_CONFIG).is_file()


def candidates(
    model_or_run: str, adapter: str | None = None, compare: tuple[str, ...] = (), with_init: bool = False
) -> list[Candidate]:
    """Columns: base first (the reference for DPO rewards), then (with_init) the run's untrained start, then the
    tuned run, then each --compare entry. The init column separates what the 4-bit residual costs from what
    training gains."""
    if is_run_dir(model_or_run):
        if adapter:
            raise ForgeError(
                "--adapter goes with a base model, not a run directory",
                where=model_or_run,
                hint="drop --adapter: a run is compared with its base model by default",
            )
        base = run_config(model_or_run).model
        columns = [Candidate("base", base), Candidate("tuned", base, model_or_run)]
        if with_init:
            columns.insert(1, Candidate("init", base, model_or_run, adapters="init"))
    else:
        columns = [Candidate("base", model_or_run)]
        if adapter:
            trained_on = run_config(adapter).model
            if not _same_model(trained_on, model_or_run):
                raise ForgeError(
                    f"the run's adapters were trained over {trained_on}, not {model_or_run}",
                    where=adapter,
                    hint="PiSSA adapters fit only the base they were factored from",
                )
            if with_init:
                columns.append(Candidate("init", trained_on, adapter, adapters="init"))
            columns.append(Candidate("tuned", trained_on, adapter))
        elif with_init:
            raise ForgeError("--with-init needs a run", hint="pass a run directory, or a model with --adapter RUN")
    for entry in compare:
        run = entry if is_run_dir(entry) else None
        label = _unique(Path(entry.rstrip("/")).name or entry, {c.label for c in columns})
        columns.append(Candidate(label, run_config(run).model if run else entry, run))
    return columns


def _same_model(a: str, b: str) -> bool:
    return a == b or (Path(a).exists() and Path(b).exists() and Path(a).resolve() == Path(b).resolve())


def _unique(label: str, taken: set[str]) -> str:
    n = 2
    candidate = label
    while candidate in taken:
        candidate, n = f"{label}-{n}", n + 1
    return candidate


def load_candidate(candidate: Candidate, dtype: str, log=print) -> tuple[nn.Module, Any]:
    log(f"loading {candidate.label}: {candidate.description}")
    if candidate.run:
        model, tokenizer, _, _ = load_run(candidate.run, dtype=dtype, adapters=candidate.adapters)
    else:
        model, tokenizer, _ = load_model(candidate.model, dtype)
    model.eval()
    return model, tokenizer


def load_eval_data(sources: tuple[str, ...], split: str, limit: int | None) -> dict[str, Dataset]:
    """{"sft": Dataset, "preference": Dataset} from files or folders (the `split` file of a folder)."""
    data: dict[str, Dataset] = {}
    for source in sources:
        dataset = load_split(source, split)
        kind = "preference" if dataset.fmt == "preference" else "sft"
        if kind in data:
            raise ForgeError(
                f"two {kind} data sources ({data[kind].path} and {dataset.path})",
                where=source,
                hint="pass one SFT file or folder and at most one preference file",
            )
        data[kind] = dataclasses.replace(dataset, records=dataset.records[:limit]) if limit else dataset
    return data


def chosen_measures(requested: tuple[str, ...] | None, data: dict[str, Dataset]) -> tuple[str, ...]:
    """The asked-for measures (each checked against the data given), or every one the data supports."""
    if requested is None:
        return tuple(m for m, kind in MEASURES.items() if kind in data)
    for measure in requested:
        if measure not in MEASURES:
            raise ForgeError(f"unknown measure '{measure}'", hint=f"use {', '.join(MEASURES)}")
        if MEASURES[measure] not in data:
            need = "chat or prompt/completion" if MEASURES[measure] == "sft" else "prompt/chosen/rejected"
            raise ForgeError(
                f"measure '{measure}' needs {need} data, and none was given",
                hint="add it with another --data",
            )
    return requested


def completion_nll(model: nn.Module, examples: list, batch_size: int, pad_id: int) -> tuple[float, int]:
    """(token-weighted mean completion NLL, supervised tokens) over one unshuffled pass."""
    losses, counts = [], []
    for batch in eval_batches(examples, batch_size, pad_id=pad_id):
        (tokens, mask), _ = sft_arrays(batch)
        loss, n_tokens = sft_loss(model, tokens, mask)
        mx.eval(loss, n_tokens)
        losses.append(loss.item())
        counts.append(n_tokens.item())
    return completion_loss(losses, counts), int(sum(counts))


def loss_scores(model, tokenizer, dataset: Dataset, encoding: Config, batch_size: int) -> tuple[dict, str]:
    """Completion-only loss and perplexity, the data encoded as the run trained (turns, max length)."""
    d = encoding.data
    split = encode_sft_split(
        dataset,
        tokenizer,
        max_seq_length=d.max_seq_length,
        overlong=d.overlong,
        mask_prompt=True,
        supervise=d.supervise,
    )
    loss, n_tokens = completion_nll(model, split.examples, batch_size, pad_id(tokenizer))
    note = (
        f"{len(split.examples)} examples of {dataset.path}, {n_tokens} supervised (completion) tokens, "
        "token-weighted; perplexity = exp(loss)"
    )
    return {"loss": loss, "perplexity": perplexity(loss)}, note


def generation_scores(model, tokenizer, dataset: Dataset, options: EvalOptions) -> tuple[dict, list, str]:
    """Exact match of greedy replies, and each reply beside its reference for the report."""
    prompts = generation_prompts(dataset, tokenizer)
    replies = greedy_replies(
        model,
        tokenizer,
        [p.tokens for p in prompts],
        max_tokens=options.max_tokens,
        batch_size=options.batch_size,
    )
    hits = matches(replies, [p.reference for p in prompts], options.extractor)
    rows = [
        {"prompt": p.text, "reference": p.reference, "reply": r, "match": h}
        for p, r, h in zip(prompts, replies, hits, strict=True)
    ]
    note = f"{len(prompts)} prompts, greedy, at most {options.max_tokens} new tokens, extractor '{options.extractor}'"
    return {"exact_match": sum(hits) / len(hits)}, rows, note


def preference_logps(model, tokenizer, dataset: Dataset, encoding: Config, batch_size: int) -> tuple[dict, str]:
    """Summed completion log-probs of chosen and rejected, per pair (the same function as DPO's reference)."""
    d = encoding.data
    pairs = encode_preference_split(dataset, tokenizer, max_seq_length=d.max_seq_length, overlong=d.overlong).examples
    logps = reference_logps(model, pairs, batch_size, False, pad_id(tokenizer))
    model.eval()  # reference_logps leaves the model in training mode
    note = (
        f"{len(pairs)} pairs of {dataset.path}; summed completion log-probs; DPO rewards use the first "
        "column as the reference"
    )
    return logps, note


def pad_id(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0


def score_model(
    model,
    tokenizer,
    data: dict[str, Dataset],
    measures: tuple[str, ...],
    encoding: Config,
    options: EvalOptions,
) -> dict[str, Any]:
    """Every measure for one model: scalar values, per-prompt generations, raw preference log-probs."""
    scores: dict[str, Any] = {"values": {}, "notes": {}}
    if "loss" in measures:
        values, scores["notes"]["loss"] = loss_scores(model, tokenizer, data["sft"], encoding, options.batch_size)
        scores["values"].update(values)
    if "generate" in measures:
        values, scores["generations"], scores["notes"]["exact_match"] = generation_scores(
            model, tokenizer, data["sft"], options
        )
        scores["values"].update(values)
    if "preference" in measures:
        scores["logps"], scores["notes"]["preference"] = preference_logps(
            model, tokenizer, data["preference"], encoding, options.batch_size
        )
    return scores


def run_eval(
    model_or_run: str,
    data_sources: tuple[str, ...],
    *,
    adapter: str | None = None,
    compare: tuple[str, ...] = (),
    with_init: bool = False,
    options: EvalOptions = EvalOptions(),
    out: str | Path | None = None,
    log=print,
) -> tuple[dict, dict[str, Path]]:
    """Score every column on the data, write eval_report.{json,md,png}; returns (report, written paths)."""
    from forge_mlx.evaluate.report import write_report

    if options.extractor not in EXTRACTORS:
        raise ForgeError(f"unknown extractor '{options.extractor}'", hint=f"use one of {', '.join(EXTRACTORS)}")
    columns = candidates(model_or_run, adapter, compare, with_init)
    run = next((c.run for c in columns if c.run), None)
    encoding = run_config(run) if run else Config()  # a run is scored with the encoding it was trained with
    data = load_eval_data(data_sources, options.split, options.limit)
    measures = chosen_measures(options.measures, data)
    report: dict[str, Any] = {
        "models": [dict(dataclasses.asdict(c), description=c.description) for c in columns],
        "measures": {},
        "notes": {},
        "generations": {},
        "settings": dict(
            dataclasses.asdict(options),
            measures=list(measures),
            data=[str(ds.path) for ds in data.values()],
            beta=encoding.dpo.beta,
        ),
    }
    results, reference = {}, None
    for column in columns:
        model, tokenizer = load_candidate(column, encoding.dtype, log)
        scores = score_model(model, tokenizer, data, measures, encoding, options)
        del model
        gc.collect()
        mx.clear_cache()
        values = scores["values"]
        if "logps" in scores:
            logps = scores["logps"]
            reference = logps if reference is None else reference
            ref = (None, None) if logps is reference else (reference["chosen"], reference["rejected"])
            values.update(preference_scores(logps["chosen"], logps["rejected"], *ref, beta=encoding.dpo.beta))
        results[column.label] = values
        report["notes"].update(scores["notes"])
        if "generations" in scores:
            report["generations"][column.label] = scores["generations"]
        log(f"  {column.label}: " + ", ".join(f"{k} {v:.4g}" for k, v in values.items()))
    report["measures"] = {
        name: {label: values.get(name) for label, values in results.items()}
        for name in ROWS
        if any(name in values for values in results.values())
    }
    out = Path(out) if out else (Path(run) if run else Path(".")) / REPORT_NAME
    return report, write_report(report, out)
