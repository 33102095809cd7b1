"""From stored predictions to answers: per-layer curves with bootstrap CIs, the task-recognition
layer with its own interval, critical layers, and compute savings.

Bootstrap: each replicate resamples test items (the same items for every layer and seed, so
curves stay paired) and seeds, recomputes each layer's corpus score (BLEU from summed
sufficient statistics; pass@1 as a mean), and finds the recognition layer of that replicate.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from ..core.costs import paper_savings
from ..tasks.metrics import Metric, metric_named
from ..util.errors import UserError

DEFAULT_FRACTION = 0.95
CONTEXT_CONDITIONS = ("instructions+examples", "examples")  # masks after which the context could be dropped
CONVERSE_SUFFIX = "-below"  # a condition hidden below j, visible from j on (core/conditions.py)


def recognition_layer(
    layers: Sequence[int], scores: Sequence[float], baseline: float, fraction: float = DEFAULT_FRACTION
) -> int:
    """First layer from which the score stays >= fraction x baseline for every later layer.

    ``layers`` ascending; the last one is normally L (no masking), which always qualifies when
    it is the baseline itself. With no plateau before L, the answer is L.
    """
    threshold = fraction * baseline
    r = layers[-1]
    for layer, score in zip(reversed(layers), reversed(scores)):
        if score >= threshold - 1e-12:
            r = layer
        else:
            break
    return r


def percentile_interval(values: Sequence[float] | np.ndarray, level: float = 0.95) -> tuple[float, float]:
    lo, hi = np.percentile(np.asarray(values, dtype=float), [50 * (1 - level), 50 * (1 + level)])
    return float(lo), float(hi)


@dataclass
class Curve:
    """One experimental cell (task, pair, kind, condition, instructions, k) over layers and seeds."""

    key: dict
    layers: list[int]
    metric: Metric
    seeds: list[int]
    # per seed: per layer: per-item statistics (the metric's sufficient statistics)
    item_stats: np.ndarray  # [seeds, layers, items, d]
    context_tokens: float = 0.0
    query_tokens: float = 0.0
    score: list[float] = field(default_factory=list)
    ci: list[tuple[float, float]] = field(default_factory=list)
    recognition: int | None = None  # None where no recognition layer can be located (see ``verdict``)
    recognition_ci: tuple[float, float] | None = None
    gain_ci: tuple[float, float] | None = None  # 95% CI of baseline - score masked from the first layer
    verdict: str = ""  # the recognition layer, or why there is none, in words

    @property
    def converse(self) -> bool:
        """A converse-window curve: the columns are hidden *below* j, so j = 0 hides nothing."""
        return self.key["kind"] == "mask" and is_converse(self.key["condition"])

    @property
    def baseline(self) -> float:
        """The score with nothing hidden: at j = L for a layer-from curve, at j = 0 for a converse one."""
        return self.score[0] if self.converse else self.score[-1]

    def label(self) -> str:
        k = self.key
        what = k["condition"] if k["kind"] == "mask" else "layer ablation"
        labels = f", {k['labels']} labels" if k.get("labels", "gold") != "gold" else ""
        return f"{what} ({'instr' if k['instructions'] else 'no instr'}, k={k['k']}{labels})"


def is_converse(condition: str) -> bool:
    """Whether a stored condition name hides its columns below j (``core/conditions.py``'s window)."""
    return condition.endswith(CONVERSE_SUFFIX)


# data: user data's digest; labels: the examples' label variant
CELL_FIELDS = ("task", "pair", "kind", "condition", "instructions", "k", "n_test", "data", "labels")
FIELD_DEFAULTS = {"labels": "gold"}  # what units stored before a field existed had


def cell_key(spec: dict, fields: tuple[str, ...] = CELL_FIELDS) -> dict:
    """A stored unit's cell: its ``fields`` (a field the unit predates: the value units had before it)."""
    return {k: spec.get(k, FIELD_DEFAULTS.get(k, "")) for k in fields}


def _cells(store, kinds: tuple[str, ...], fields: tuple[str, ...]) -> list[tuple[dict, list[dict], Metric]]:
    """The store's units of ``kinds`` grouped by ``fields`` (seeds of one cell together, in seed order),
    with the cell's metric."""
    cells: dict[str, list[dict]] = {}
    for unit in store.units():
        spec = unit["spec"]
        if spec["kind"] in kinds:
            key = cell_key(spec, fields)
            cells.setdefault(json.dumps(key, sort_keys=True), []).append(unit)
    out = []
    for key_json, units in sorted(cells.items()):
        units.sort(key=lambda u: u["spec"]["seed"])
        out.append((json.loads(key_json), units, metric_named(store.primary_metric(units[0]["unit_id"]))))
    return out


def _per_seed(store, units: list[dict]) -> tuple[list[int], list[list[dict]]]:
    """A cell's seeds and each seed's prediction rows: the units of one seed (the cell swept again with other
    layers or heads) merged into one, not stacked as if they were two seeds."""
    seeds: list[int] = []
    rows: list[list[dict]] = []
    for unit in units:  # in seed order
        if not seeds or seeds[-1] != unit["spec"]["seed"]:
            seeds.append(unit["spec"]["seed"])
            rows.append([])
        rows[-1].extend(store.predictions(unit["unit_id"]))
    return seeds, rows


def _shared(key: dict, per_seed: list[set[int]], what: str) -> list[int]:
    """The layers (or heads) every seed of a cell has; an error naming the cell where they share none."""
    common = sorted(set.intersection(*per_seed))
    if not common:
        cell = ", ".join(f"{f}={key[f]}" for f in key if key[f] not in ("", None))
        raise UserError(f"the seeds of cell {cell} share no swept {what}: sweep every seed over the same {what}")
    return common


def item_stats(prediction: dict) -> list[float]:
    """A stored prediction's sufficient statistics (stores written before pass@1 kept them: the item's score)."""
    return json.loads(prediction["stats"]) if prediction["stats"] else [prediction["sentence_score"]]


def load_curves(store) -> list[Curve]:
    """Group the store's layer-sweep units into curves (one per cell; seeds stacked, a seed's units merged;
    the layers every seed has)."""
    curves = []
    for key, units, metric in _cells(store, ("mask", "ablation"), CELL_FIELDS):
        seeds, per_seed = _per_seed(store, units)
        layers = _shared(key, [{p["layer"] for p in preds} for preds in per_seed], "layers")
        n_items = max(p["item"] for p in per_seed[0]) + 1
        d = len(item_stats(per_seed[0][0]))
        arr = np.zeros((len(per_seed), len(layers), n_items, d))
        index = {layer: i for i, layer in enumerate(layers)}
        for s, preds in enumerate(per_seed):
            for p in preds:
                if p["layer"] in index:
                    arr[s, index[p["layer"]], p["item"]] = item_stats(p)
        curve = Curve(
            key=key,
            layers=layers,
            metric=metric,
            seeds=seeds,
            item_stats=arr,
            context_tokens=float(np.mean([u["context_tokens"] for u in units])),
            query_tokens=float(np.mean([u["query_tokens"] for u in units])),
        )
        curves.append(curve)
    return curves


def analyse_curve(curve: Curve, fraction: float = DEFAULT_FRACTION, n_boot: int = 1000, seed: int = 0) -> Curve:
    """Fill in score per layer (mean over seeds), 95% bootstrap CIs, recognition layer and its CI."""
    S, L, N, _ = curve.item_stats.shape
    curve.score = [
        float(np.mean([curve.metric.aggregate(curve.item_stats[s, layer]) for s in range(S)])) for layer in range(L)
    ]
    rng = np.random.default_rng(seed)
    boot = np.zeros((n_boot, L))
    recog = np.zeros(n_boot)
    for b in range(n_boot):
        items = rng.integers(0, N, N)
        seeds = rng.integers(0, S, S)
        for layer in range(L):
            boot[b, layer] = np.mean([curve.metric.aggregate(curve.item_stats[s, layer, items]) for s in seeds])
        recog[b] = locate(curve, boot[b], fraction)
    curve.ci = [percentile_interval(boot[:, layer]) for layer in range(L)]
    if curve.key["kind"] == "mask":
        nothing, everything = (0, -1) if curve.converse else (-1, 0)
        curve.gain_ci = percentile_interval(boot[:, nothing] - boot[:, everything])
        located = locate(curve, curve.score, fraction)
        curve.verdict = judge(curve, located, percentile_interval(recog), fraction)
        if not curve.verdict.startswith("no "):
            curve.recognition, curve.recognition_ci = located, percentile_interval(recog)
    return curve


def locate(curve: Curve, scores: Sequence[float], fraction: float) -> int:
    """The layer a masking curve points to, for one set of scores (the curve's or a bootstrap replicate's):
    layer-from: the recognition layer; converse window: ``unharmed_until``."""
    if curve.converse:
        return unharmed_until(curve.layers, scores, scores[0], fraction)
    return recognition_layer(curve.layers, scores, scores[-1], fraction)


def unharmed_until(
    layers: Sequence[int], scores: Sequence[float], baseline: float, fraction: float = DEFAULT_FRACTION
) -> int:
    """Converse window: the last layer w such that hiding the columns below every j <= w keeps the score
    >= fraction x baseline (``layers`` ascending from 0 = nothing hidden). The columns are then not
    needed below w, and are read from w on; with a layer-from curve's r: read in layers w..r-1."""
    threshold = fraction * baseline
    w = layers[0]
    for layer, score in zip(layers, scores):
        if score >= threshold - 1e-12:
            w = layer
        else:
            break
    return w


def judge(curve: Curve, recognition: int, ci: tuple[float, float], fraction: float) -> str:
    """The recognition layer, or an honest 'none': a baseline the bootstrap does not put above the
    score masked from the first layer, or a curve that never climbs back to the threshold."""
    first, last = curve.layers[0], curve.layers[-1]
    if len(curve.layers) < 2:
        return "no recognition layer: one layer setting only"
    assert curve.gain_ci is not None  # analyse_curve sets it before judging
    lo, hi = curve.gain_ci
    if curve.converse:
        if lo <= 0:
            return (
                f"no layer: nothing hidden ({curve.baseline:.1f}) is not above hidden below {last} "
                f"({curve.score[-1]:.1f}) (95% CI of the difference {lo:.1f} to {hi:.1f})"
            )
        return f"unharmed if hidden below layers <= {recognition} (95% CI {ci[0]:.0f}-{ci[1]:.0f}) of {last}"
    if lo <= 0:
        return (
            f"no recognition layer: baseline {curve.baseline:.1f} is not above masked-from-{first} "
            f"{curve.score[0]:.1f} (95% CI of the difference {lo:.1f} to {hi:.1f})"
        )
    if recognition >= last:
        return (
            f"no recognition layer: the score stays below {fraction:.0%} of the baseline "
            f"({curve.baseline:.1f}) until the last layer"
        )
    return f"recognition layer {recognition} (95% CI {ci[0]:.0f}-{ci[1]:.0f}) of {last}"


def critical_layers(curve: Curve, fraction: float = DEFAULT_FRACTION) -> list[int]:
    """Ablation curves: layers whose removal drops the score below fraction x baseline."""
    return [layer for layer, score in zip(curve.layers[:-1], curve.score[:-1]) if score < fraction * curve.baseline]


@dataclass
class Savings:
    recognition: int
    num_layers: int
    k: int
    paper_formula: float  # (L - r)/L * k/(k+1)
    token_exact: float  # (L - r)/L * context/(context + query), from the stored token counts


def savings(curve: Curve, num_layers: int) -> Savings | None:
    """Share of prompt processing saved by dropping the context after the recognition layer.

    Only meaningful where the mask hides the context (instructions and/or examples) and
    leaves the query visible; other conditions get None.
    """
    if curve.recognition is None or curve.key.get("condition") not in CONTEXT_CONDITIONS:
        return None  # no recognition layer located, or a mask that hides more than the context
    r, L, k = curve.recognition, num_layers, curve.key["k"]
    after = (L - r) / L
    total = curve.context_tokens + curve.query_tokens
    exact = after * curve.context_tokens / total if total else math.nan
    return Savings(r, L, k, paper_savings(L, r, k), exact)


def summary_lines(curve: Curve, num_layers: int | None = None) -> list[str]:
    """Two lines per curve for a terminal: the verdict with baseline and savings, then the score by layer."""
    head = f"{curve.key['task']} {curve.key['pair']} {curve.label()}".replace("  ", " ")
    s = savings(curve, num_layers or curve.layers[-1])
    if curve.key["kind"] != "mask":
        found = f"critical layers {critical_layers(curve) or 'none'}"
    else:
        found = curve.verdict
    saved = (
        f"; savings {100 * s.paper_formula:.1f}% (paper formula), {100 * s.token_exact:.1f}% (exact tokens)"
        if s is not None
        else ""
    )
    by_layer = " ".join(f"{layer}:{v:.1f}" for layer, v in zip(curve.layers, curve.score))
    return [
        f"{head}: baseline {curve.metric.label} {curve.baseline:.1f}; {found}{saved}",
        f"  {curve.metric.label} by layer: {by_layer}",
    ]


# --------------------------------------------------------------------------- head sweeps


@dataclass
class HeadMap:
    """One head sweep cell: the score change of every (layer, head) against its reference.

    knockout: the context hidden from one head at one layer, against the unmasked baseline;
    restore: the context hidden from layer j on except from one head, against everything hidden from j.
    """

    key: dict
    layers: list[int]
    heads: list[int]
    metric: Metric
    stats: np.ndarray  # [seeds, layers, heads, items, d]
    reference: np.ndarray  # [seeds, items, d]
    delta: np.ndarray = field(default_factory=lambda: np.zeros(0))  # [layers, heads]
    ci: np.ndarray = field(default_factory=lambda: np.zeros(0))  # [layers, heads, 2]
    reference_score: float = 0.0

    def label(self) -> str:
        k = self.key
        what = "knockout" if k["kind"] == "knockout" else f"restoration from layer {k['from_layer']}"
        return f"{k['condition']} head {what} ({'instr' if k['instructions'] else 'no instr'}, k={k['k']})"

    def top(self, n: int = 10) -> list[tuple[int, int, float, tuple[float, float]]]:
        """(layer, head, change, CI): the heads the task needs most (knockout: largest drops) or that
        recover it most (restore: largest gains)."""
        sign = -1.0 if self.key["kind"] == "knockout" else 1.0
        order = np.argsort(-sign * self.delta, axis=None)[:n]
        out = []
        for flat in order:
            li, hi = np.unravel_index(flat, self.delta.shape)
            out.append(
                (
                    self.layers[li],
                    self.heads[hi],
                    float(self.delta[li, hi]),
                    (float(self.ci[li, hi, 0]), float(self.ci[li, hi, 1])),
                )
            )
        return out


def load_head_maps(store) -> list[HeadMap]:
    maps = []
    for key, units, metric in _cells(store, ("knockout", "restore"), CELL_FIELDS + ("from_layer",)):
        kind = key["kind"]
        per_seed = _per_seed(store, units)[1]
        head_rows = [[p for p in preds if p["variant"].startswith(kind + "/h")] for preds in per_seed]
        layers = _shared(key, [{p["layer"] for p in rows} for rows in head_rows], "layers")
        heads = _shared(key, [{int(p["variant"].split("/h")[1]) for p in rows} for rows in head_rows], "heads")
        n_items = max(p["item"] for p in per_seed[0]) + 1
        d = len(item_stats(per_seed[0][0]))
        stats = np.zeros((len(per_seed), len(layers), len(heads), n_items, d))
        reference = np.zeros((len(per_seed), n_items, d))
        ref_layer = (
            max(p["layer"] for p in per_seed[0] if p["variant"] == "mask") if kind == "knockout" else key["from_layer"]
        )
        li, hi = {layer: i for i, layer in enumerate(layers)}, {h: i for i, h in enumerate(heads)}
        for s, preds in enumerate(per_seed):
            for p in preds:
                if p["variant"] == "mask" and p["layer"] == ref_layer:
                    reference[s, p["item"]] = item_stats(p)
                elif p["variant"].startswith(kind + "/h") and p["layer"] in li:
                    head = int(p["variant"].split("/h")[1])
                    if head in hi:
                        stats[s, li[p["layer"]], hi[head], p["item"]] = item_stats(p)
        maps.append(HeadMap(key, layers, heads, metric, stats, reference))
    return maps


def analyse_head_map(m: HeadMap, n_boot: int = 1000, seed: int = 0) -> HeadMap:
    """Score change per (layer, head) against the reference (mean over seeds), with 95% bootstrap
    intervals that resample items and seeds together for every cell (so changes stay paired)."""
    S, L, H, N, _ = m.stats.shape
    agg = m.metric.aggregate

    def change(seeds, items):
        ref = float(np.mean([agg(m.reference[s, items]) for s in seeds]))
        return np.array(
            [[np.mean([agg(m.stats[s, layer, h, items]) for s in seeds]) for h in range(H)] for layer in range(L)]
        ) - ref, ref

    m.delta, m.reference_score = change(range(S), np.arange(N))
    rng = np.random.default_rng(seed)
    boot = np.stack([change(rng.integers(0, S, S), rng.integers(0, N, N))[0] for _ in range(n_boot)])
    m.ci = np.stack([np.percentile(boot, 2.5, axis=0), np.percentile(boot, 97.5, axis=0)], axis=-1)
    return m


def head_summary_lines(m: HeadMap, n: int = 3) -> list[str]:
    """The heads that matter most, for a terminal."""
    head = f"{m.key['task']} {m.key['pair']} {m.label()}".replace("  ", " ")
    ref = "baseline" if m.key["kind"] == "knockout" else f"masked from {m.key['from_layer']}"
    tops = "; ".join(f"L{layer}H{h} {d:+.1f} ({lo:+.1f} to {hi:+.1f})" for layer, h, d, (lo, hi) in m.top(n))
    return [f"{head}: {m.metric.label} {ref} {m.reference_score:.1f}; top heads: {tops}"]


def audit_disagreement(row: dict) -> str:
    """One audited row that disagrees with the reference engine: a near-tie or an engine fault, where."""
    kind = "ENGINE FAULT" if row["fault"] else "near-tie"
    margin = "n/a" if row["margin"] is None else f"{row['margin']:.4g}"
    return (
        f"{kind}: item {row['item']} {row['variant']} layer {row['layer']}: first difference at new token "
        f"{row['position']}, reference margin {margin} (threshold {row['threshold']:.3g})"
    )
