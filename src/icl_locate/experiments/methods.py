"""Other methods on the same depth axis as context masking: the task vector, the function vector and
the logit lens, as unit kinds of a sweep (same tasks, prompts, metric and store).

Protocols (what a unit of each kind computes, on the unit's test items, k examples, one seed):

* ``task-vector`` (Hendel et al., 2023, with their dummy query): theta_l of query i is the input of
  decoder layer l at the last position of the ICL prompt of query i+1 (the next test item, cyclically:
  the same k examples with a different query). It replaces the hidden state at the last position of
  query i's zero-shot prompt (the same instructions, no examples) at layer l; then greedy decoding and
  the task's metric as usual, for every l in 0..L-1. Stored beside: the zero-shot prompt unpatched and
  the full ICL prompt (variants "zero-shot" and "icl" at layer L).
* ``function-vector`` (Todd et al., 2024): each head's output at the last position averaged over the
  unit's ICL prompts (gold labels); on the same prompts with the examples' answers shuffled among the
  examples (the "shuffled" label variant: no example keeps its answer), the indirect effect of head
  (l, h) = the probability of the reference answer's first token with that head's output replaced by
  its mean, minus without; averaged over the first ``AIE_PROMPTS`` of them (AIE; Todd et al. average
  over 25 prompts; stored per prompt as "aie/h<h>"). The
  function vector = the sum of the top-K heads' mean outputs through the output projection, added at
  the last position of the zero-shot prompt at layer l, for every l; baselines as above.
* ``logit-lens``: at the query's last position, the final norm and LM head applied to the residual
  stream at every layer 0..L (L: the model's own output): the reference answer's first token's top-1,
  probability and rank, with the context visible ("lens/visible") and with the unit's condition
  hidden at every layer ("lens/hidden").
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..core.conditions import MaskedPrompt, get_condition
from ..core.interventions import UNCHANGED, ColumnMask, MaskBelow, MaskFrom, RowIntervention
from ..core.models import LoadedModel
from ..core.patches import PatchLastPosition
from ..core.prompts import PromptedItem, answer_first_token
from ..engines.base import Engine, ProgressCallback, StopRule
from ..engines.indirect import head_indirect_effects
from ..engines.readout import check_head_logits, function_vector, lens_readings, lens_states
from ..engines.rows import row_plan
from ..tasks.items import build_items
from ..tasks.spec import Task, TaskData
from ..util.errors import UserError
from .common import masked_prompts
from .scoring import Decoded, prediction_row
from .settings import METHODS
from .unchanged import UnchangedGenerations, UnmaskedReadings

METHOD_KINDS = tuple(m for m in METHODS if m != "mask")
AIE_PROMPTS = 25  # corrupted prompts the indirect effects average over (Todd et al.'s n_trials)


@dataclass
class MethodOutput:
    """What a method unit gives the worker: decoded rows to score with the task's metric, rows stored as
    they are (indirect effects, lens readings), and the decoding an audit may check."""

    decoded: dict[tuple[str, int], Decoded] = field(default_factory=dict)
    predictions: list[dict] = field(default_factory=list)
    scores: list[tuple[str, int, str, float]] = field(default_factory=list)
    audit_prompts: list = field(default_factory=list)
    audit_rows: dict[tuple[str, int], RowIntervention] = field(default_factory=dict)
    audit_generations: dict = field(default_factory=dict)


@dataclass
class MethodInputs:
    """A method unit's model, data and decoding settings."""

    loaded: LoadedModel
    engine: Callable[[Sequence[MaskedPrompt], Sequence[RowIntervention], StopRule], Engine]  # for these rows
    task: Task
    data: TaskData
    items: list[PromptedItem]  # the unit's ICL prompts (k examples, gold labels)
    stop: StopRule
    progress: ProgressCallback | None = None
    unchanged: UnchangedGenerations = field(default_factory=UnchangedGenerations)  # the worker's, across units
    readings: UnmaskedReadings = field(default_factory=UnmaskedReadings)  # the worker's, across units

    @property
    def model(self) -> nn.Module:
        assert self.loaded.model is not None  # a loaded model, not a description
        return self.loaded.model

    @property
    def tokenizer(self) -> Any:  # a transformers tokenizer (LoadedModel keeps it untyped)
        return self.loaded.tokenizer


def run_method(unit, inputs: MethodInputs) -> MethodOutput:
    """Compute a ``task-vector``, ``function-vector`` or ``logit-lens`` unit (module docstring)."""
    if unit.kind in ("logit-lens", "function-vector"):
        check_head_logits(inputs.model, f"--method {unit.kind}")
    if unit.kind == "logit-lens":
        return logit_lens_rows(inputs, unit.condition, unit.layers)
    if len(inputs.items) < 2 and unit.kind == "task-vector":
        raise UserError("--method task-vector reads each query's vector from another query's prompt: --n-test >= 2")
    zero = build_items(inputs.task, inputs.data, inputs.tokenizer, 0, unit.seed, unit.n_test, unit.instructions)
    if unit.kind == "task-vector":
        hidden = inputs.readings.read(inputs.model, *_ids_and_starts(inputs.items)).hidden
        assert hidden is not None
        states = hidden[:, list(unit.layers)]  # [items, layers, d]
        donors = [(i + 1) % len(inputs.items) for i in range(len(inputs.items))]
        rows: dict[tuple[str, int], RowIntervention] = {
            ("task-vector", layer): PatchLastPosition(layer, "replace", states[donors, n])  # [items, d]
            for n, layer in enumerate(unit.layers)
        }
        return decode_with_baselines(inputs, zero, rows)
    if unit.kind == "function-vector":
        vector, output = function_vector_of(inputs, unit)
        rows: dict[tuple[str, int], RowIntervention] = {
            ("function-vector", layer): PatchLastPosition(layer, "add", vector) for layer in unit.layers
        }
        decoded = decode_with_baselines(inputs, zero, rows)
        decoded.predictions, decoded.scores = output.predictions, output.scores
        return decoded
    raise ValueError(f"not a method unit: {unit.kind}")


def decode_with_baselines(
    inputs: MethodInputs, zero: list[PromptedItem], rows: dict[tuple[str, int], RowIntervention]
) -> MethodOutput:
    """``rows`` decoded on the zero-shot prompts, with the zero-shot prompts unpatched and the ICL
    prompts as baselines (at layer L); the ICL prompts' generations are taken from the worker's
    ``unchanged`` where an earlier unit decoded them."""
    n_layers = inputs.loaded.info.num_layers
    rows = {**rows, ("zero-shot", n_layers): UNCHANGED}
    zero_prompts, icl_prompts = masked_prompts(zero, None), masked_prompts(inputs.items, None)
    engine = inputs.engine(zero_prompts, list(rows.values()), inputs.stop)
    gens = engine.generate(zero_prompts, list(rows.values()), inputs.stop, inputs.progress)
    icl = inputs.unchanged.find(icl_prompts, inputs.stop)  # e.g. the layer sweep's rows masked from L
    if icl is None:
        by_key = engine.generate(icl_prompts, [UNCHANGED], inputs.stop)  # the same engine: identical anyway
        inputs.unchanged.keep(icl_prompts, [UNCHANGED], by_key, inputs.stop, n_layers)
        icl = [by_key[(i, UNCHANGED)] for i in range(len(icl_prompts))]
    decoded = {
        key: Decoded(zero, zero_prompts, [gens[(i, row)] for i in range(len(zero))]) for key, row in rows.items()
    }
    decoded[("icl", n_layers)] = Decoded(inputs.items, icl_prompts, icl)
    return MethodOutput(decoded, audit_prompts=zero_prompts, audit_rows=rows, audit_generations=gens)


def function_vector_of(inputs: MethodInputs, unit) -> tuple[torch.Tensor, MethodOutput]:
    """The function vector of the unit's prompts and the stored per-head indirect effects."""
    model, tokenizer = inputs.model, inputs.tokenizer
    if unit.k < 2:
        raise UserError("--method function-vector corrupts prompts by shuffling the examples' answers: --k >= 2")
    shuffled = build_items(
        inputs.task, inputs.data, tokenizer, unit.k, unit.seed, unit.n_test, unit.instructions, labels="shuffled"
    )[:AIE_PROMPTS]
    answers = [answer_first_token(tokenizer, it.encoded, it.item.target) for it in shuffled]
    means = inputs.readings.read(model, *_ids_and_starts(inputs.items)).mean_heads()  # [L, H, head_dim]
    effects = head_indirect_effects(model, _ids_and_starts(shuffled)[0], answers, means)  # [items, L, H]
    average = effects.mean(0)  # [L, H]
    n_heads = average.shape[1]
    order = torch.argsort(average.flatten(), descending=True, stable=True)[: unit.top_heads]
    heads = [divmod(int(flat), n_heads) for flat in order]
    output = MethodOutput()
    prompts = masked_prompts(shuffled, None)
    for (layer, h), value in zip(
        [(layer, h) for layer in range(average.shape[0]) for h in range(n_heads)], average.flatten().tolist()
    ):
        output.scores.append((f"aie/h{h}", layer, "aie", value))
        for i, (it, prompt) in enumerate(zip(shuffled, prompts, strict=True)):
            effect = float(effects[i, layer, h])
            output.predictions.append(
                prediction_row(
                    i,
                    it,
                    prompt,
                    f"aie/h{h}",
                    layer,
                    masked=False,
                    raw="",
                    text="",
                    finish="",
                    score=effect,
                    stats=[effect],
                )
            )
    return function_vector(model, means, heads), output


def logit_lens_rows(inputs: MethodInputs, condition_name: str, layers: Sequence[int]) -> MethodOutput:
    """The lens at ``layers`` for every item, context visible and hidden (the condition at every layer)."""
    model, tokenizer = inputs.model, inputs.tokenizer
    n_layers = inputs.loaded.info.num_layers
    condition = get_condition(condition_name)
    hide = MaskBelow(n_layers) if condition.window == "below" else MaskFrom(0)
    prompts = masked_prompts(inputs.items, condition)
    answers = [answer_first_token(tokenizer, it.encoded, it.item.target) for it in inputs.items]
    plans = [row_plan(p, hide, n_layers, i) for i, p in enumerate(prompts)]
    hidden = ColumnMask(
        [p.hidden if plan.mask_layers else () for p, plan in zip(prompts, plans, strict=True)],
        [plan.mask_layers for plan in plans],
        [plan.mask_heads for plan in plans],
        [plan.others_only for plan in plans],
    )
    ids, starts = [p.ids for p in prompts], [p.query_start() for p in prompts]
    # the context runs once per variant: the hidden one under its mask
    visible = inputs.readings.read(model, ids, starts).lens()
    states = [visible, lens_states(model, ids, starts, hidden)]  # [items, L+1, d] each
    sites = [
        (i, variant, variant == "lens/hidden") for variant in ("lens/visible", "lens/hidden") for i in range(len(ids))
    ]
    answer_rows = [answer for answer in answers for _ in range(n_layers + 1)] * len(states)  # as states, flat
    stats, top = lens_readings(model, torch.cat(states).flatten(0, 1), answer_rows)  # [items x 2 x (L+1), 3]
    stats = stats.view(len(sites), n_layers + 1, 3)
    output = MethodOutput()
    readings: dict[tuple[str, int], list[torch.Tensor]] = {}
    for n, (i, variant, masked) in enumerate(sites):
        for layer in layers:
            readings.setdefault((variant, layer), []).append(stats[n, layer])
            word = tokenizer.decode([top[n * (n_layers + 1) + layer]])
            output.predictions.append(
                prediction_row(
                    i,
                    inputs.items[i],
                    prompts[i],
                    variant,
                    layer,
                    masked=masked,
                    raw=word,
                    text=word,
                    finish="lens",
                    score=float(stats[n, layer, 0]),
                    stats=stats[n, layer].tolist(),
                )
            )
    for (variant, layer), values in sorted(readings.items()):
        stacked = torch.stack(values)  # [items, 3]
        output.scores += [
            (variant, layer, "top1", float(stacked[:, 0].mean())),
            (variant, layer, "prob", float(stacked[:, 1].mean())),
            (variant, layer, "rank", float(stacked[:, 2].median())),
        ]
    return output


def _ids_and_starts(items: Sequence[PromptedItem]) -> tuple[list[list[int]], list[int]]:
    """The items' token ids and where each one's query begins (what follows the shared context)."""
    prompts = masked_prompts(items, None)
    return [p.ids for p in prompts], [p.query_start() for p in prompts]
