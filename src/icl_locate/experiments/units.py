"""Computing one work unit: a pure function of (worker, unit) that returns the rows to store.

A ``Worker`` holds what computing needs and is loaded once: the model, an engine, the task data
and the token limit. ``Worker.compute(unit)`` decodes every (item, layer) row of the unit with the
engine, scores each layer with the task's metric and returns a ``UnitResult``; it writes
nothing. Committing results is the driver's job (``sweep.execute``), so an executor can run
workers anywhere (this process, Ray actors) and the store keeps one writer.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Sequence

from ..core.conditions import get_condition
from ..core.interventions import AblateLayers, HeadMask, MaskFrom, RowIntervention
from ..core.models import LoadedModel, load_model
from ..engines.base import Engine, Progress
from ..engines.sweep import SweepEngine
from ..engines.tree import TreeEngine
from ..tasks.registry import build_items, post_process
from .common import check_context, masked_prompts, stop_rule
from .settings import SweepConfig, TaskCache, WorkUnit, load_task_data


@dataclass
class UnitResult:
    """Everything the store keeps of one finished unit."""

    unit: WorkUnit
    seconds: float
    predictions: list[dict]
    scores: list[tuple[str, int, str, float]]  # (variant, layer, metric, value)
    context_tokens: float
    query_tokens: float


def row_interventions(unit: WorkUnit, n_layers: int, n_heads: int) -> dict[tuple[str, int], RowIntervention]:
    """(variant, layer) as stored -> the row intervention that computes it. Head sweeps store the head
    in the variant ("knockout/h3") and keep their references (baseline; restore: masked from j) beside."""
    if unit.kind == "mask":
        return {("mask", j): MaskFrom(j) for j in unit.layers}
    if unit.kind == "ablation":
        return {("ablate", j): AblateLayers(frozenset({j}) if j < n_layers else frozenset()) for j in unit.layers}
    rows: dict[tuple[str, int], RowIntervention] = {("mask", n_layers): MaskFrom(n_layers)}
    if unit.kind == "knockout":
        rows.update({(f"knockout/h{h}", l): HeadMask(frozenset({(l, h)})) for l in unit.layers for h in range(n_heads)})
        return rows
    j = unit.from_layer
    hidden_from_j = {(l, h) for l in range(j, n_layers) for h in range(n_heads)}
    rows[("mask", j)] = MaskFrom(j)
    rows.update({(f"restore/h{h}", l): HeadMask(frozenset(hidden_from_j - {(l, h)})) for l in unit.layers
                 for h in range(n_heads)})
    return rows


def span_lengths(spans: dict) -> dict:
    length = lambda p: (spans[p][1] - spans[p][0]) if spans.get(p) else 0  # noqa: E731
    return dict(n_instructions=length("instructions"), n_examples=length("examples"), n_query=length("query"))


def sweep_engine(config: SweepConfig, loaded: LoadedModel) -> Engine:
    """The engine ``config.engine`` names (both give the same generations; the tree engine is faster)."""
    if config.engine == "fast":
        return SweepEngine(loaded.model, loaded.tokenizer, batch_size=config.batch_size)
    return TreeEngine(loaded.model, loaded.tokenizer, batch_size=config.batch_size, draft_tokens=config.draft_tokens)


@dataclass
class Worker:
    """A loaded model with its engine and task data: computes units, writes nothing."""

    loaded: LoadedModel
    engine: Engine
    tasks: TaskCache
    max_new_tokens: int | None = None

    @classmethod
    def load(cls, config: SweepConfig) -> "Worker":
        """A worker for ``config``'s sweep: its data, its model (dtype and device as configured), the sweep engine."""
        tasks = load_task_data(config)
        loaded = load_model(config.model, dtype=config.dtype, device=config.device)
        return cls(loaded, sweep_engine(config, loaded), tasks, config.max_new_tokens)

    def compute(self, unit: WorkUnit, progress: Progress | None = None) -> UnitResult:
        task, data, items = unit_items(self.loaded.tokenizer, self.tasks, unit)
        n_layers = self.loaded.info.num_layers
        condition = get_condition(unit.condition) if unit.kind != "ablation" else None
        prompts = masked_prompts(items, condition)
        rows = row_interventions(unit, n_layers, self.loaded.info.num_heads)
        started = time.time()
        gens = self.engine.generate(prompts, list(rows.values()), stop_rule(task, self.max_new_tokens), progress)
        seconds = time.time() - started
        predictions, scores = [], []
        examples = [it.item for it in items]
        for (kind, layer), row in rows.items():
            outputs = [gens[(i, row)] for i in range(len(items))]
            texts = [post_process(task, g.text) for g in outputs]
            scored = task.metric.score(texts, examples, data)
            scores += [(kind, layer, metric, value) for metric, value in scored.corpus.items()]
            masked = condition is not None and layer < n_layers
            for i, (it, prompt, g, text) in enumerate(zip(items, prompts, outputs, texts)):
                predictions.append(dict(
                    item=i, example_id=it.item.id, variant=kind, layer=layer,
                    prompt_token_ids=json.dumps(prompt.ids), hidden_ranges=json.dumps(prompt.hidden if masked else []),
                    in_context_ids=json.dumps(it.encoded.example_ids), raw_generation=g.text, generation=text,
                    reference=it.item.target, finish=g.finish, sentence_score=scored.sentence[i],
                    stats=json.dumps(scored.stats[i]), **span_lengths(prompt.spans)))
        lengths = [span_lengths(it.encoded.spans) for it in items]
        context = sum(n["n_instructions"] + n["n_examples"] for n in lengths) / len(items)
        query = sum(n["n_query"] for n in lengths) / len(items)
        return UnitResult(unit, seconds, predictions, scores, context, query)


def unit_items(tokenizer, tasks: TaskCache, unit: WorkUnit):
    """The unit's task, data and prompted test items (deterministic: seeded example sampling)."""
    task, data = tasks[(unit.task, unit.pair)]
    return task, data, build_items(task, data, tokenizer, unit.k, unit.seed, unit.n_test, unit.instructions)


def check_units(loaded: LoadedModel, tasks: TaskCache, units: Sequence[WorkUnit], max_new_tokens: int | None) -> None:
    """Prompt + answer must fit the model's context in every unit, checked before any decoding
    (k against the bank was checked before the model loaded: ``sweep.check_k``)."""
    for unit in units:
        task, _, items = unit_items(loaded.tokenizer, tasks, unit)
        check_context(items, loaded, stop_rule(task, max_new_tokens).max_new_tokens, unit.label())
