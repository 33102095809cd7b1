"""The depth atlas: where each way of locating in-context learning points, on one layer axis.

One atlas per experimental cell (task, pair, instructions, k, n_test, data; gold labels) that holds at
least one task-vector, function-vector or logit-lens unit. Each method's score per layer is divided by
the method's own baseline, so methods with different metrics share one axis (1 = the baseline):

- masking (the layer sweep of ``analysis``: the context hidden from layer j on): / the unmasked score;
  points to the recognition layer, exactly as ``analysis.analyse_curve`` locates it;
- task vector, function vector (patched at layer l into the zero-shot prompt): / the ICL prompt's score;
  points to the best layer (the first maximum);
- logit lens (the final norm and LM head applied at layer l, context visible or hidden, under each masking
  condition stored): the answer's top-1 rate / the visible lens's at the last layer (the model's own
  output); points to the first layer from which the answer stays top-1 (``analysis.recognition_layer``
  with the curve's final rate).

Bootstrap as ``analysis``: each replicate resamples test items and seeds once for every row of a method
(so its layers and its baseline stay paired); the same seed draws the same replicates as
``analysis.analyse_curve``. Function-vector units also hold every head's average indirect effect
("aie/h{h}" rows), read here as an ``IndirectEffectMap`` (a ``HeadMap``: the figures draw both alike).
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import numpy as np

from ..tasks.metrics import Scored, metric_named
from .analysis import (
    CONTEXT_CONDITIONS,
    DEFAULT_FRACTION,
    Curve,
    HeadMap,
    analyse_curve,
    cell_key,
    item_stats,
    load_curves,
    percentile_interval,
    recognition_layer,
)

ATLAS_FIELDS = ("task", "pair", "instructions", "k", "n_test", "data")  # one atlas per cell of these
VECTOR_KINDS = ("task-vector", "function-vector")  # the stored variant of the patched rows is the kind
LENS_KIND = "logit-lens"
AIE_PREFIX = "aie/h"  # function-vector units: one head's average indirect effect per row
LENS_METHODS = {"lens/visible": "logit-lens", "lens/hidden": "logit-lens (context hidden)"}
FURTHER_LENS = "logit-lens (hidden: "  # + condition + ")": the hidden lens of each further condition stored
METHODS = ("masking", *VECTOR_KINDS, *LENS_METHODS.values())  # the order methods are drawn and listed in

Stats = np.ndarray  # [seeds, rows, items, d]: per-item statistics of one method's rows
Aggregate = Callable[[np.ndarray], float]  # [items, d] -> the corpus score of one row


@dataclass
class MethodCurve:
    """One method's score per layer, normalised to the method's own baseline, and the layer it points to."""

    method: str
    layers: list[int]
    score: list[float]  # raw, in ``score_label``'s units, mean over seeds
    normalised: list[float]  # score / baseline (NaN where the baseline is 0)
    band: list[tuple[float, float]]  # 95% bootstrap interval of the normalised score
    score_label: str  # what ``score`` is, e.g. "BLEU" or "top-1 rate (%)"
    baseline: float
    baseline_what: str  # what the baseline is, in words
    point: int | None  # the layer the method points to; None where it points nowhere (``what`` says why)
    interval: tuple[float, float] | None  # 95% bootstrap interval of ``point``
    what: str  # what ``point`` is, in words
    references: dict[str, float] = field(default_factory=dict)  # other levels worth a line, normalised


@dataclass
class IndirectEffectMap(HeadMap):
    """The function-vector heads of one cell: each head's average indirect effect (``delta``, with 95%
    bootstrap intervals over prompts and seeds), against a reference of zero. ``top_heads``: how many
    heads the unit's function vector summed (the ones ``top`` lists first)."""

    top_heads: int = 0

    def label(self) -> str:
        instructions = "instr" if self.key["instructions"] else "no instr"
        return f"function-vector heads: average indirect effect ({instructions}, k={self.key['k']})"


@dataclass
class Atlas:
    """One cell's methods on one layer axis (``METHODS`` order), and its function-vector heads if stored."""

    key: dict  # ATLAS_FIELDS
    num_layers: int
    methods: dict[str, MethodCurve]
    aie: IndirectEffectMap | None = None

    def title(self) -> str:
        k = self.key
        cell = " ".join(str(v) for v in (k["task"], k["pair"]) if v)
        return f"{cell}: depth atlas (k={k['k']}, {'instr' if k['instructions'] else 'no instr'})"


@dataclass(frozen=True)
class IndirectEffect:
    """The per-item statistic of "aie/h*" rows, as a metric: [ie], averaged. The engine computes it from
    output probabilities, so there is nothing to score from answers."""

    name: str = "aie"
    label: str = "average indirect effect"
    higher_is_better: bool = True

    def score(self, answers: Sequence[str], examples: Sequence, data) -> Scored:
        raise NotImplementedError("indirect effects come from the model's probabilities, not from answers")

    def aggregate(self, stats: np.ndarray) -> float:
        return float(stats[:, 0].mean())


def top1_rate(stats: np.ndarray) -> float:
    """Logit-lens rows (stats [top1, prob, rank]): the share of items whose answer is the top token, in %."""
    return 100.0 * float(stats[:, 0].mean())


def load_atlases(
    store,
    n_boot: int = 1000,
    seed: int = 0,
    fraction: float = DEFAULT_FRACTION,
    curves: list[Curve] | None = None,
) -> list[Atlas]:
    """Every atlas of the store, in cell order. ``curves``: the store's curves already analysed with the same
    ``fraction``, ``n_boot`` and ``seed`` (the report's), so they are not analysed twice; None: analysed here."""
    cells: dict[str, dict[str, list[dict]]] = {}
    for unit in store.units():
        spec = unit["spec"]
        if spec["kind"] in (*VECTOR_KINDS, LENS_KIND) and spec.get("labels", "gold") == "gold":
            key = json.dumps(cell_key(spec, ATLAS_FIELDS), sort_keys=True)
            cells.setdefault(key, {}).setdefault(spec["kind"], []).append(unit)
    if not cells:
        return []
    if curves is None:
        curves = [analyse_curve(c, fraction, n_boot, seed) for c in load_curves(store)]
    atlases = []
    for key_json, by_kind in sorted(cells.items()):
        key = json.loads(key_json)
        methods: dict[str, MethodCurve] = {}
        lasts = []  # L as each method stored it: the unmasked row, the ICL prompt's, the model's own output
        mask = masking_curve(curves, key)
        if mask is not None:
            methods["masking"] = _masking_method(mask, n_boot, seed)
            lasts.append(mask.layers[-1])
        for kind in VECTOR_KINDS:
            if kind in by_kind:
                methods[kind], last = _vector_method(store, kind, _by_seed(by_kind[kind]), n_boot, seed)
                lasts.append(last)
        if LENS_KIND in by_kind:
            methods |= _lens_conditions(store, by_kind[LENS_KIND], n_boot, seed, fraction)
            lasts.append(methods["logit-lens"].layers[-1])
        aie = None
        if "function-vector" in by_kind:
            aie = load_indirect_effects(store, key, _by_seed(by_kind["function-vector"]), n_boot, seed)
        ordered = [m for m in METHODS if m in methods] + [m for m in methods if m not in METHODS]
        atlases.append(Atlas(key, max(lasts), {m: methods[m] for m in ordered}, aie))
    return atlases


def masking_curve(curves: list[Curve], key: dict) -> Curve | None:
    """The atlas's masking curve among ``curves``: the cell's gold-label layer-from mask curve of the
    condition first in ``analysis.CONTEXT_CONDITIONS`` (instructions+examples, then examples), or None."""
    found = {
        c.key["condition"]: c
        for c in curves
        if c.key["kind"] == "mask"
        and c.key.get("labels", "gold") == "gold"
        and all(c.key[f] == key[f] for f in ATLAS_FIELDS)
    }
    return next((found[c] for c in CONTEXT_CONDITIONS if c in found), None)


def bootstrap(stats: Stats, aggregate: Aggregate, n_boot: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Each row's score (mean over seeds) [rows] and ``n_boot`` replicates [n_boot, rows]. Each replicate draws
    items, then seeds, in ``analysis.analyse_curve``'s order (the same seed: the same replicates), once for
    every row, so rows stay paired."""
    n_seeds, n_rows, n_items, _ = stats.shape

    def scores(seeds, items) -> np.ndarray:
        return np.array([np.mean([aggregate(stats[s, r, items]) for s in seeds]) for r in range(n_rows)])

    point = scores(range(n_seeds), np.arange(n_items))
    rng = np.random.default_rng(seed)
    boot = np.empty((n_boot, n_rows))
    for b in range(n_boot):
        items = rng.integers(0, n_items, n_items)
        boot[b] = scores(rng.integers(0, n_seeds, n_seeds), items)
    return point, boot


def _ratio(values: np.ndarray, baseline: np.ndarray | float) -> np.ndarray:
    """values / baseline, NaN where the baseline is 0 (a method whose baseline scores nothing has no scale)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        out = np.asarray(values, dtype=float) / baseline
    out[~np.isfinite(out)] = np.nan
    return out


def _band(replicates: np.ndarray) -> list[tuple[float, float]]:
    """95% interval per column of [n_boot, layers], over the replicates that have a finite value."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a column of NaN (a baseline of 0): NaN, no noise
        lo, hi = np.nanpercentile(replicates, [2.5, 97.5], axis=0)
    return [(float(a), float(b)) for a, b in zip(lo, hi)]


def _masking_method(curve: Curve, n_boot: int, seed: int) -> MethodCurve:
    """The masking curve normalised to its unmasked score; its point and interval are the analysis's own."""
    point, boot = bootstrap(curve.item_stats, curve.metric.aggregate, n_boot, seed)
    return MethodCurve(
        method="masking",
        layers=list(curve.layers),
        score=list(curve.score),
        normalised=list(_ratio(point, point[-1])),
        band=_band(_ratio(boot, boot[:, -1:])),
        score_label=curve.metric.label,
        baseline=curve.baseline,
        baseline_what=f"{curve.metric.label} with nothing masked ({curve.key['condition']} masking)",
        point=curve.recognition,
        interval=curve.recognition_ci,
        what="recognition layer" if curve.recognition is not None else curve.verdict,
    )


def _by_seed(units: list[dict]) -> list[dict]:
    return sorted(units, key=lambda u: u["spec"]["seed"])


def _lens_conditions(store, units: list[dict], n_boot: int, seed: int, fraction: float) -> dict[str, MethodCurve]:
    """The lens of every condition stored (every seed of each): the visible lens and the context hidden of the
    condition first in CONTEXT_CONDITIONS (else the first stored), then each other condition's hidden lens as
    "logit-lens (hidden: <condition>)" (its visible rows are the same prompts': one visible curve is drawn)."""
    stored = sorted({u["spec"]["condition"] for u in units})
    conditions = [c for c in CONTEXT_CONDITIONS if c in stored] + [c for c in stored if c not in CONTEXT_CONDITIONS]
    methods: dict[str, MethodCurve] = {}
    for condition in conditions:
        lens = _lens_methods(
            store, _by_seed([u for u in units if u["spec"]["condition"] == condition]), n_boot, seed, fraction
        )
        if not methods:
            methods = lens
        else:
            name = f"{FURTHER_LENS}{condition})"
            methods[name] = replace(lens["logit-lens (context hidden)"], method=name)
    return methods


def _stack(per_seed: list[list[dict]], rows: list[tuple[str, int]]) -> Stats:
    """Per-item statistics of ``rows`` ((variant, layer) each), stacked over seeds: [seeds, rows, items, d]."""
    index = {row: i for i, row in enumerate(rows)}
    kept = [[p for p in preds if (p["variant"], p["layer"]) in index] for preds in per_seed]
    n_items = max(p["item"] for preds in kept for p in preds) + 1
    stats = np.zeros((len(per_seed), len(rows), n_items, len(item_stats(kept[0][0]))))
    for s, preds in enumerate(kept):
        for p in preds:
            stats[s, index[(p["variant"], p["layer"])], p["item"]] = item_stats(p)
    return stats


def _layers(per_seed: list[list[dict]], variant: str) -> list[int]:
    """The layers every seed stored ``variant`` at, ascending."""
    return sorted(set.intersection(*({p["layer"] for p in preds if p["variant"] == variant} for preds in per_seed)))


def _vector_method(store, kind: str, units: list[dict], n_boot: int, seed: int) -> tuple[MethodCurve, int]:
    """A task or function vector patched at each layer, normalised to the ICL prompt's score; points to the
    first best layer, with the 2.5/97.5 percentiles of the replicates' best layers as its interval (nowhere
    when no layer scores above the zero-shot prompt). With L, the layer the ICL prompt is stored at."""
    metric = metric_named(store.primary_metric(units[0]["unit_id"]))
    per_seed = [store.predictions(u["unit_id"]) for u in units]
    layers = _layers(per_seed, kind)
    last = max(_layers(per_seed, "icl"))  # L: the ICL and zero-shot prompts are stored at the last layer
    stats = _stack(per_seed, [(kind, layer) for layer in layers] + [("zero-shot", last), ("icl", last)])
    point, boot = bootstrap(stats, metric.aggregate, n_boot, seed)
    n = len(layers)
    zero_shot, icl = point[n], point[n + 1]
    best = np.asarray(layers)[np.argmax(boot[:, :n], axis=1)]
    # a vector that never beats the zero-shot prompt it is patched into points nowhere
    helps = float(np.max(point[:n])) > float(zero_shot) + 1e-12
    curve = MethodCurve(
        method=kind,
        layers=layers,
        score=[float(v) for v in point[:n]],
        normalised=list(_ratio(point[:n], icl)),
        band=_band(_ratio(boot[:, :n], boot[:, n + 1 :])),
        score_label=metric.label,
        baseline=float(icl),
        baseline_what=f"{metric.label} of the ICL prompt (zero-shot: {zero_shot:.2f})",
        point=layers[int(np.argmax(point[:n]))] if helps else None,
        interval=percentile_interval(best) if helps else None,
        what="best layer" if helps else "no layer scores above the zero-shot prompt",
        references={"zero-shot prompt": float(_ratio(np.array([zero_shot]), icl)[0])},
    )
    return curve, last


def _lens_methods(store, units: list[dict], n_boot: int, seed: int, fraction: float) -> dict[str, MethodCurve]:
    """The logit lens with the context visible and hidden, both normalised to the visible lens's top-1 rate at
    the last layer (the model's own output); each points to the first layer from which the answer stays
    top-1 (>= ``fraction`` of its own final rate)."""
    per_seed = [store.predictions(u["unit_id"]) for u in units]
    layers = {variant: _layers(per_seed, variant) for variant in LENS_METHODS}
    rows = [(variant, layer) for variant in LENS_METHODS for layer in layers[variant]]
    point, boot = bootstrap(_stack(per_seed, rows), top1_rate, n_boot, seed)
    n_visible = len(layers["lens/visible"])
    baseline, baseline_boot = point[n_visible - 1], boot[:, n_visible - 1 : n_visible]
    condition = units[0]["spec"]["condition"]
    out, start = {}, 0
    for variant, method in LENS_METHODS.items():
        ls = layers[variant]
        part, part_boot = point[start : start + len(ls)], boot[:, start : start + len(ls)]
        start += len(ls)
        never = part[-1] <= 0  # the answer is never top-1 at the end: no layer from which it stays so
        # a replicate whose answer is never top-1 at the end points nowhere before L (not to layer 0)
        located = [recognition_layer(ls, b.tolist(), b[-1], fraction) if b[-1] > 0 else ls[-1] for b in part_boot]
        out[method] = MethodCurve(
            method=method,
            layers=ls,
            score=[float(v) for v in part],
            normalised=list(_ratio(part, baseline)),
            band=_band(_ratio(part_boot, baseline_boot)),
            score_label="top-1 rate (%)",
            baseline=float(baseline),
            baseline_what=f"top-1 rate of the model's output (layer {layers['lens/visible'][-1]}), context visible"
            + ("" if variant == "lens/visible" else f"; hidden: {condition}"),
            point=None if never else recognition_layer(ls, part.tolist(), part[-1], fraction),
            interval=None if never else percentile_interval(located),
            what="the answer is never top-1" if never else "first layer where the answer is top-1",
        )
    return out


def load_indirect_effects(store, key: dict, units: list[dict], n_boot: int, seed: int) -> IndirectEffectMap | None:
    """The "aie/h*" rows of a cell's function-vector units (one per seed) as an analysed map, or None."""
    per_seed = [[p for p in store.predictions(u["unit_id"]) if p["variant"].startswith(AIE_PREFIX)] for u in units]
    if not per_seed[0]:
        return None
    layers = sorted({p["layer"] for p in per_seed[0]})
    heads = sorted({int(p["variant"].removeprefix(AIE_PREFIX)) for p in per_seed[0]})
    n_items = max(p["item"] for preds in per_seed for p in preds) + 1
    stats = np.zeros((len(per_seed), len(layers), len(heads), n_items, 1))
    li, hi = {layer: i for i, layer in enumerate(layers)}, {h: i for i, h in enumerate(heads)}
    for s, preds in enumerate(per_seed):
        for p in preds:
            stats[s, li[p["layer"]], hi[int(p["variant"].removeprefix(AIE_PREFIX))], p["item"]] = item_stats(p)[:1]
    m = IndirectEffectMap(
        key=dict(key, kind="function-vector", condition=""),
        layers=layers,
        heads=heads,
        metric=IndirectEffect(),
        stats=stats,
        reference=np.zeros((len(per_seed), n_items, 1)),
        top_heads=int(units[0]["spec"].get("top_heads") or 0),
    )
    return analyse_indirect_effects(m, n_boot, seed)


def analyse_indirect_effects(m: IndirectEffectMap, n_boot: int = 1000, seed: int = 0) -> IndirectEffectMap:
    """``analysis.analyse_head_map`` for a mean against a reference of zero, vectorised (a model's every head
    times n_boot replicates): mean effect per (layer, head) over items and seeds, 95% bootstrap intervals
    resampling seeds, then items, together for every head (the same draws as ``analyse_head_map``)."""
    effects = m.stats[..., 0]  # [seeds, layers, heads, items]
    n_seeds, n_items = effects.shape[0], effects.shape[-1]
    m.delta = effects.mean(axis=(0, 3))
    rng = np.random.default_rng(seed)
    boot = np.empty((n_boot, *m.delta.shape))
    for b in range(n_boot):
        seeds = rng.integers(0, n_seeds, n_seeds)
        boot[b] = effects[seeds][..., rng.integers(0, n_items, n_items)].mean(axis=(0, 3))
    m.ci = np.stack([np.percentile(boot, 2.5, axis=0), np.percentile(boot, 97.5, axis=0)], axis=-1)
    m.reference_score = 0.0
    return m
