"""The report's Explore section as plain data (JSON-able dicts): every curve with its 95% intervals, pooled
over seeds and per seed; every head map; and, for the first few test items of each unit shown, the stored
generation of every row beside the row nothing was hidden from, the reference, and the prompt with the
tokens that row hid marked.

Everything comes from the store: the analysed curves and head maps (``analysis``), the prediction rows
(``Store.predictions``) and the prompts (``Store.prompts``: the text and each token's character range, which
map a row's stored hidden token ranges to characters). A unit stored before prompts were kept has
``prompt`` None for its items (the page says "prompt not stored"). ``interactive`` turns this into the page.
"""

from __future__ import annotations

import json
import math
from dataclasses import replace

from ..core.conditions import merge_ranges
from .analysis import CELL_FIELDS, Curve, HeadMap, analyse_curve, analyse_head_map, cell_key
from .figures import curve_title

N_ITEMS = 5  # test items shown per unit: the first ones of the test set (deterministic, as stored)
HEAD_FIELDS = CELL_FIELDS + ("from_layer",)


def explore_data(
    store, curves: list[Curve], heads: list[HeadMap], num_layers: int, fraction: float, n_boot: int
) -> dict:
    """The page's data: ``curves`` and ``heads`` (analysed) with per-seed copies where a cell has several
    seeds, the units whose generations they show, and the prompts those units hold (each text once)."""
    index = _unit_index(store)
    units: dict[str, dict] = {}
    prompts: dict[str, int] = {}
    curve_entries, head_entries = [], []
    for c in curves:
        seeds = _seed_units(index, c.key, CELL_FIELDS)
        for seed, curve in _per_view(c, seeds, lambda c, i: _one_seed_curve(c, i, fraction, n_boot)):
            unit_id = seeds[curve.seeds[0]]
            units.setdefault(unit_id, unit_rows(store, unit_id, prompts))
            curve_entries.append(curve_entry(curve, seed, seeds, unit_id, units[unit_id], num_layers))
    for m in heads:
        seeds = _seed_units(index, m.key, HEAD_FIELDS)
        for seed, hm in _per_view(m, seeds, lambda m, i: _one_seed_map(m, i, n_boot)):
            unit_id = seeds[list(seeds)[0] if seed == "all" else seed]
            units.setdefault(unit_id, unit_rows(store, unit_id, prompts))
            head_entries.append(head_entry(hm, seed, seeds, unit_id, units[unit_id]))
    return dict(curves=curve_entries, heads=head_entries, units=units, prompts=list(prompts), n_items=N_ITEMS)


def _unit_index(store) -> dict[tuple[str, str], dict[int, str]]:
    """(kind group, cell key as JSON) -> {seed: unit id}, for the layer and the head sweeps' units; a seed swept
    in several units (other layers or heads) has their ids joined by "+" (``unit_rows`` merges them)."""
    index: dict[tuple[str, str], dict[int, str]] = {}
    for u in store.units():
        spec = u["spec"]
        fields = CELL_FIELDS if spec["kind"] in ("mask", "ablation") else HEAD_FIELDS
        seeds = index.setdefault((spec["kind"], json.dumps(cell_key(spec, fields), sort_keys=True)), {})
        seeds[spec["seed"]] = "+".join(filter(None, (seeds.get(spec["seed"]), u["unit_id"])))
    return index


def _seed_units(index, key: dict, fields) -> dict[int, str]:
    """The cell's units by seed, in seed order (the order ``analysis`` stacks them in)."""
    found = index.get((key["kind"], json.dumps({f: key[f] for f in fields}, sort_keys=True)), {})
    return dict(sorted(found.items()))


def _per_view(analysed, seeds: dict[int, str], one_seed):
    """(view, result) pairs: the pooled result ("all") and, where the cell has several seeds, each seed's
    own (``one_seed(result, seed position)``)."""
    yield "all", analysed
    if len(seeds) > 1:
        for i, seed in enumerate(seeds):
            yield seed, one_seed(analysed, i)


def _one_seed_curve(c: Curve, i: int, fraction: float, n_boot: int) -> Curve:
    """Seed ``i`` of a curve alone, analysed afresh (its bootstrap resamples items only)."""
    alone = replace(
        c,
        seeds=[c.seeds[i]],
        item_stats=c.item_stats[i : i + 1],
        score=[],
        ci=[],
        recognition=None,
        recognition_ci=None,
        gain_ci=None,
        verdict="",
    )
    return analyse_curve(alone, fraction, n_boot)


def _one_seed_map(m: HeadMap, i: int, n_boot: int) -> HeadMap:
    """Seed ``i`` of a head map alone, analysed afresh."""
    return analyse_head_map(replace(m, stats=m.stats[i : i + 1], reference=m.reference[i : i + 1]), n_boot)


def _views(seed, seeds: dict[int, str]) -> list[str]:
    """The seed filter's values that show an entry: "all" for the pooled one, the seed for a seed's own; a
    cell with one seed has only the pooled entry, shown under both."""
    if seed != "all":
        return [str(seed)]
    return ["all"] + ([str(s) for s in seeds] if len(seeds) == 1 else [])


def _num(x) -> float | None:
    """A number for JSON: rounded, and None for NaN or infinity (JSON has neither)."""
    x = float(x)
    return round(x, 4) if math.isfinite(x) else None


def curve_entry(c: Curve, seed, seeds: dict[int, str], unit_id: str, unit: dict, num_layers: int) -> dict:
    """One curve as the page draws it, and where its generations are: ``unit`` (the first seed's unit for a
    pooled curve), row ``variant@layer``, against ``baseline_row`` (the row with no intervention, or None
    where the sweep did not run it)."""
    k = c.key
    variant = "mask" if k["kind"] == "mask" else "ablate"
    baseline = f"{variant}@{0 if c.converse else num_layers}"
    return dict(
        task=k["task"],
        pair=k["pair"],
        kind=k["kind"],
        condition=k["condition"] if k["kind"] == "mask" else "layer ablation",
        instructions=k["instructions"],
        k=k["k"],
        labels=k.get("labels", "gold"),
        group=curve_title(k["task"], k["pair"], k["kind"], k["k"]),
        name=c.label() + ("" if seed == "all" else f", seed {seed}"),
        seed="all" if seed == "all" else str(seed),
        seeds=[str(s) for s in c.seeds],
        views=_views(seed, seeds),
        metric=c.metric.label,
        layers=list(c.layers),
        score=[_num(s) for s in c.score],
        lo=[_num(lo) for lo, _ in c.ci],
        hi=[_num(hi) for _, hi in c.ci],
        recognition=c.recognition,
        verdict=c.verdict,
        converse=c.converse,
        unit=unit_id,
        unit_seed=str(c.seeds[0]),
        variant=variant,
        baseline_row=baseline if baseline in unit["rows"] else None,
    )


def head_entry(m: HeadMap, seed, seeds: dict[int, str], unit_id: str, unit: dict) -> dict:
    """One head map as the page draws it: change per (layer, head) with its interval, and its reference row
    (knockout: nothing hidden; restoration: everything hidden from j)."""
    k = m.key
    masks = [int(r.split("@")[1]) for r in unit["rows"] if r.startswith("mask@")]
    reference = max(masks) if k["kind"] == "knockout" else k["from_layer"]
    return dict(
        task=k["task"],
        pair=k["pair"],
        kind=k["kind"],
        condition=k["condition"],
        instructions=k["instructions"],
        k=k["k"],
        from_layer=k.get("from_layer"),
        title=f"Heads: {k['task']} {k['pair']} {m.label()}" + ("" if seed == "all" else f", seed {seed}"),
        seed="all" if seed == "all" else str(seed),
        seeds=[str(s) for s in seeds],
        views=_views(seed, seeds),
        metric=m.metric.label,
        layers=list(m.layers),
        heads=list(m.heads),
        delta=[[_num(v) for v in row] for row in m.delta],
        lo=[[_num(v) for v in row] for row in m.ci[..., 0]],
        hi=[[_num(v) for v in row] for row in m.ci[..., 1]],
        reference_score=_num(m.reference_score),
        reference=("nothing hidden" if k["kind"] == "knockout" else f"hidden from layer {reference} on, every head"),
        reference_row=f"mask@{reference}" if f"mask@{reference}" in unit["rows"] else None,
        unit=unit_id,
        unit_seed=str(list(seeds)[0] if seed == "all" else seed),
    )


def unit_rows(store, unit_id: str, prompts: dict[str, int]) -> dict:
    """The first ``N_ITEMS`` items of a unit (example id, reference, prompt: an index into ``prompts``, each
    text added once, or None where the store has no prompt) and every row's generations of them, by
    ``variant@layer``: generation, sentence score and the hidden characters of the prompt. ``unit_id`` may join
    several units of one cell and seed with "+": their rows together (a row in two: the first's)."""
    stored: dict[int, dict] = {}
    predictions: list[dict] = []
    for one in unit_id.split("+"):
        stored = store.prompts(one) | stored
        predictions += store.predictions(one)
    items: dict[int, dict] = {}
    rows: dict[str, list[dict]] = {}
    seen: set[tuple[str, int]] = set()
    for p in predictions:
        key = f"{p['variant']}@{p['layer']}"
        if p["item"] >= N_ITEMS or (key, p["item"]) in seen:
            continue
        seen.add((key, p["item"]))
        prompt = stored.get(p["item"])
        if p["item"] not in items:
            items[p["item"]] = dict(
                item=p["item"],
                example_id=p["example_id"],
                reference=p["reference"],
                prompt=None if prompt is None else prompts.setdefault(prompt["text"], len(prompts)),
            )
        rows.setdefault(key, []).append(
            dict(
                item=p["item"],
                generation=p["generation"],
                score=None if p["sentence_score"] is None else _num(p["sentence_score"]),
                hidden=None if prompt is None else hidden_characters(p["hidden_ranges"], prompt["token_offsets"]),
            )
        )
    return dict(items=sorted(items.values(), key=lambda i: i["item"]), rows=rows)


def hidden_characters(hidden_ranges: str | None, offsets: list[list[int]]) -> list[list[int]]:
    """A row's hidden token ranges (as stored, JSON) as character ranges of its prompt: from the first hidden
    token's first character to the last one's end, overlapping ranges merged."""
    spans: list[tuple[int, int]] = []
    for start, end in json.loads(hidden_ranges or "[]"):
        if 0 <= start < end <= len(offsets):
            spans.append((offsets[start][0], offsets[end - 1][1]))
    return [list(r) for r in merge_ranges(spans)]
