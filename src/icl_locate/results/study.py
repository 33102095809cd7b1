"""A study store as pandas DataFrames with tidy columns, and its figures as matplotlib Figures: the
reading side of the Python API (``icl_locate.api.open_store``).

Nothing is computed here that ``analysis`` and ``figures`` do not compute for the report: this module
only lays their results out as one observation per row.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from ..util.errors import UserError
from . import analysis, figures
from .atlas import Atlas, load_atlases
from .store import Store

if TYPE_CHECKING:
    import pandas as pd

CELL = list(analysis.CELL_FIELDS)
CURVE_COLUMNS = [*CELL, "metric", "layer", "score", "ci_low", "ci_high"]
RECOGNITION_COLUMNS = [*CELL, "metric", "baseline", "recognition_layer", "ci_low", "ci_high", "verdict"]
HEAD_CELL = [*CELL, "from_layer"]
HEAD_COLUMNS = [*HEAD_CELL, "metric", "reference_score", "layer", "head", "delta", "ci_low", "ci_high"]
ATLAS_CELL = ["task", "pair", "instructions", "k"]
ATLAS_COLUMNS = [*ATLAS_CELL, "method", "layer", "score", "normalised", "lo", "hi"]
ATLAS_POINT_COLUMNS = [*ATLAS_CELL, "method", "layer", "lo", "hi", "what"]
PREDICTION_FIELDS = ["item", "example_id", "variant", "layer", "generation", "raw_generation", "reference"]
PREDICTION_COLUMNS = [*HEAD_CELL, "seed", "unit_id", *PREDICTION_FIELDS, "sentence_score", "finish"]
LORA_COLUMNS = [
    "pair",
    "layer",
    "bleu",
    "n_test",
    "best_val_loss",
    "epochs",
    "train_loss",
    "val_loss",
    "train_tokens",
    "sequence_tokens",
    "train_seconds",
    "seconds",
    "loss",
    "settings",
    "adapter",
    "unit_id",
]
PRUNING_COLUMNS = [
    "task",
    "pair",
    "model",
    "condition",
    "from_layer",
    "num_layers",
    "k",
    "sentences",
    "metric",
    "full_score",
    "pruned_score",
    "quality_kept",
    "flops_saved_prompt",
    "flops_saved_total",
    "time_saved_prefill",
    "time_saved_total",
    "kv_saved",
    "paper_estimate",
    "identical_to_masked",
]


class Study:
    """A study store, read: its results as pandas DataFrames with tidy columns (one observation per row),
    its figures as matplotlib Figures.

    Every method reads the store when called (a sweep may still be adding units). Curves and head maps
    come with 95% bootstrap intervals over ``n_boot`` replicates that resample test items and seeds
    together (``seed`` fixes the draw), as ``icl-locate report`` computes them; the cell columns, shared
    by every table, are ``task``, ``pair`` ("" for tasks without pairs), ``kind`` ("mask", "ablation",
    "knockout", "restore", "task-vector", "function-vector" or "logit-lens"), ``condition`` ("" for layer
    ablation and the vectors), ``instructions`` (bool), ``k``,
    ``n_test`` (None: the whole test set), ``data`` (a digest of user data; "" for built-in datasets) and
    ``labels`` (the examples' label variant). ``atlas`` and ``atlas_points`` lay out the depth atlas (every
    locating method, task and function vectors and the logit lens included, on one layer axis).
    """

    def __init__(self, path: str | Path):
        self.path = Path(path).expanduser()
        self._analysed: dict[str, tuple[tuple, list]] = {}
        with self._store():  # a missing or unreadable store fails here, once
            pass

    def _store(self) -> Store:
        return Store(self.path, create=False)

    def _cached(self, name: str, params: tuple, compute: Callable[[Store], list]) -> list:
        """``compute(store)``, kept until the parameters or the store's finished units change."""
        with self._store() as store:
            key = (params, frozenset(store.done_units()), len(store.lora_results()))
            if self._analysed.get(name, (None,))[0] != key:
                self._analysed[name] = (key, compute(store))
        return self._analysed[name][1]

    def analysed_curves(
        self, fraction: float = analysis.DEFAULT_FRACTION, n_boot: int = 1000, seed: int = 0
    ) -> list[analysis.Curve]:
        """The store's curves as ``results.analysis`` computes them (``Curve``: scores, intervals,
        recognition layer, verdict), for what the DataFrames leave out."""
        return self._cached(
            "curves",
            (fraction, n_boot, seed),
            lambda store: [analysis.analyse_curve(c, fraction, n_boot, seed) for c in analysis.load_curves(store)],
        )

    def analysed_head_maps(self, n_boot: int = 1000, seed: int = 0) -> list[analysis.HeadMap]:
        """The store's head sweeps as ``results.analysis`` computes them (``HeadMap``)."""
        return self._cached(
            "heads",
            (n_boot, seed),
            lambda store: [analysis.analyse_head_map(m, n_boot, seed) for m in analysis.load_head_maps(store)],
        )

    def analysed_atlases(
        self, fraction: float = analysis.DEFAULT_FRACTION, n_boot: int = 1000, seed: int = 0
    ) -> list[Atlas]:
        """The store's depth atlases as ``results.atlas`` computes them (``Atlas``: every method's
        ``MethodCurve``, the function-vector heads' ``IndirectEffectMap``)."""
        curves = self.analysed_curves(fraction, n_boot, seed)
        return self._cached(
            "atlases", (fraction, n_boot, seed), lambda store: load_atlases(store, n_boot, seed, fraction, curves)
        )

    def curves(self, fraction: float = analysis.DEFAULT_FRACTION, n_boot: int = 1000, seed: int = 0) -> pd.DataFrame:
        """One row per (cell, layer) of the layer sweeps (masking and layer ablation).

        Columns: the cell columns, then ``metric`` (the task's, e.g. "bleu"), ``layer`` (j: hidden from
        layer j on, or below j for a "-below" condition; ablation: the layer removed; the number of layers:
        nothing hidden or removed), ``score`` (mean over seeds), ``ci_low``, ``ci_high`` (95% interval).
        """
        rows = [
            {**c.key, "metric": c.metric.name, "layer": layer, "score": score, "ci_low": lo, "ci_high": hi}
            for c in self.analysed_curves(fraction, n_boot, seed)
            for layer, score, (lo, hi) in zip(c.layers, c.score, c.ci)
        ]
        return _frame(rows, columns=CURVE_COLUMNS)

    def recognition(
        self, fraction: float = analysis.DEFAULT_FRACTION, n_boot: int = 1000, seed: int = 0
    ) -> pd.DataFrame:
        """One row per masking curve: where the task is recognised.

        Columns: the cell columns, then ``metric``, ``baseline`` (the score with nothing hidden),
        ``recognition_layer`` (the first layer from which masking keeps >= ``fraction`` of the baseline
        for every later layer; for a "-below" condition, the last layer below which hiding keeps it;
        <NA> where the bootstrap cannot support one), ``ci_low``, ``ci_high`` (its 95% interval) and
        ``verdict`` (the layer, or why there is none, in words).
        """
        rows = []
        for c in self.analysed_curves(fraction, n_boot, seed):
            if c.key["kind"] == "mask":
                lo, hi = c.recognition_ci or (math.nan, math.nan)
                rows.append(
                    {**c.key, "metric": c.metric.name, "baseline": c.baseline, "recognition_layer": c.recognition}
                    | {"ci_low": lo, "ci_high": hi, "verdict": c.verdict}
                )
        return _frame(rows, columns=RECOGNITION_COLUMNS).astype({"recognition_layer": "Int64"})

    def head_maps(self, n_boot: int = 1000, seed: int = 0) -> pd.DataFrame:
        """One row per (cell, layer, head) of the head sweeps (``--heads knockout|restore``).

        Columns: the cell columns and ``from_layer`` (restore: the context hidden from there on), then
        ``metric``, ``reference_score`` (knockout: the unmasked baseline; restore: everything hidden from
        ``from_layer``), ``layer``, ``head`` (query head), ``delta`` (score change against the reference,
        mean over seeds), ``ci_low``, ``ci_high`` (its 95% interval).
        """
        rows = [
            {**m.key, "metric": m.metric.name, "reference_score": m.reference_score, "layer": layer, "head": head}
            | {"delta": float(m.delta[i, j]), "ci_low": float(m.ci[i, j, 0]), "ci_high": float(m.ci[i, j, 1])}
            for m in self.analysed_head_maps(n_boot, seed)
            for i, layer in enumerate(m.layers)
            for j, head in enumerate(m.heads)
        ]
        return _frame(rows, columns=HEAD_COLUMNS)

    def atlas(self, fraction: float = analysis.DEFAULT_FRACTION, n_boot: int = 1000, seed: int = 0) -> pd.DataFrame:
        """One row per (atlas, method, layer): the depth atlas, every way of locating the task on one layer axis.

        An atlas is a cell (task, pair, instructions, k; gold labels) with task-vector, function-vector or
        logit-lens units. Columns: ``task``, ``pair``, ``instructions``, ``k``, ``method`` ("masking",
        "task-vector", "function-vector", "logit-lens", "logit-lens (context hidden)", and
        "logit-lens (hidden: <condition>)" for each further masking condition the lens was run under),
        ``layer``, ``score``
        (raw: the task's metric; the lens: the share of items whose answer is the top token, in %),
        ``normalised`` (score / the method's own baseline: masking: nothing masked; vectors: the ICL prompt;
        lens: the model's own output with the context visible), ``lo``, ``hi`` (its 95% bootstrap interval).
        """
        rows = [
            {f: a.key[f] for f in ATLAS_CELL}
            | {"method": name, "layer": layer, "score": score, "normalised": normalised, "lo": lo, "hi": hi}
            for a in self.analysed_atlases(fraction, n_boot, seed)
            for name, m in a.methods.items()
            for layer, score, normalised, (lo, hi) in zip(m.layers, m.score, m.normalised, m.band)
        ]
        return _frame(rows, columns=ATLAS_COLUMNS)

    def atlas_points(
        self, fraction: float = analysis.DEFAULT_FRACTION, n_boot: int = 1000, seed: int = 0
    ) -> pd.DataFrame:
        """One row per (atlas, method): the layer each method points to.

        Columns: ``task``, ``pair``, ``instructions``, ``k``, ``method`` (as ``atlas``), ``layer`` (masking:
        the recognition layer; vectors: the best layer, the first maximum; lens: the first layer from which
        the answer stays top-1, at >= ``fraction`` of the last layer's rate; <NA> where a method points
        nowhere), ``lo``, ``hi`` (its 95% bootstrap interval) and ``what`` (what the layer is, or why there
        is none, in words).
        """
        rows = [
            {f: a.key[f] for f in ATLAS_CELL}
            | {"method": name, "layer": m.point, "what": m.what}
            | dict(zip(("lo", "hi"), m.interval or (math.nan, math.nan)))
            for a in self.analysed_atlases(fraction, n_boot, seed)
            for name, m in a.methods.items()
        ]
        return _frame(rows, columns=ATLAS_POINT_COLUMNS).astype({"layer": "Int64"})

    def predictions(self) -> pd.DataFrame:
        """One row per stored generation: what the model said for each test item at each row of a unit.

        Columns: the cell columns, ``from_layer``, ``seed``, ``unit_id``, ``item`` (index in the test set),
        ``example_id``, ``variant`` ("mask", "ablate", or the head row, e.g. "knockout/h3"), ``layer``,
        ``generation`` (the answer as scored), ``raw_generation`` (as decoded), ``reference``,
        ``sentence_score`` and ``finish`` ("stop", "eos" or "length").
        """
        with self._store() as store:
            rows = [
                {**analysis.cell_key(u["spec"], tuple(HEAD_CELL)), "seed": u["spec"]["seed"], "unit_id": u["unit_id"]}
                | {c: p[c] for c in [*PREDICTION_FIELDS, "sentence_score", "finish"]}
                for u in store.units()
                for p in store.predictions(u["unit_id"])
            ]
        return _frame(rows, columns=PREDICTION_COLUMNS)

    def lora(self) -> pd.DataFrame:
        """One row per single-layer LoRA result (``icl-locate lora-sweep``).

        Columns: ``pair``, ``layer`` (the adapted layer), ``bleu`` (zero-shot BLEU with that adapter),
        ``n_test``, ``best_val_loss``, ``epochs``, ``train_loss`` and ``val_loss`` (per epoch, lists),
        ``train_tokens`` (loss targets), ``sequence_tokens``, ``train_seconds``, ``seconds`` (the whole
        layer), ``loss`` ("answer" or "full"), ``settings`` (dict), ``adapter`` (its directory), ``unit_id``.
        """
        with self._store() as store:
            results = store.lora_results()
        rows = [
            {c: r.get(c) for c in LORA_COLUMNS}
            | {"epochs": len(r.get("train_loss", [])), "loss": r.get("settings", {}).get("loss", "full")}
            for r in results
        ]
        return _frame(rows, columns=LORA_COLUMNS)

    def pruning(self) -> pd.DataFrame:
        """One row per context-pruning measurement (``icl-locate prune``).

        Columns: ``task``, ``pair``, ``model``, ``condition``, ``from_layer`` (r), ``num_layers``, ``k``,
        ``sentences``, ``metric``, ``full_score``, ``pruned_score``, ``quality_kept``, the shares saved
        (``flops_saved_prompt``, ``flops_saved_total``, ``time_saved_prefill``, ``time_saved_total``,
        ``kv_saved``), ``paper_estimate`` ((L - r)/L * k/(k+1)), ``identical_to_masked`` (generations equal
        to masking from r; None: not checked; ``checked_by_store`` of them settled by the store's layer-sweep
        rows, ``checked_by_fast_engine`` decoded again); then every other measurement, those of the two runs
        prefixed ``full_`` and ``pruned_`` (seconds, memory, GFLOPs, ...). Generations are left out.
        """
        with self._store() as store:
            rows = [_flat_measurement(d) for d in store.pruning_results()]
        frame = _frame(rows)
        return frame.reindex(columns=[*PRUNING_COLUMNS, *(c for c in frame.columns if c not in PRUNING_COLUMNS)])

    # ------------------------------------------------------------------ figures

    def curve_figure(self, task: str | None = None, pair: str | None = None, kind: str = "mask", k: int | None = None):
        """The report's figure of one (task, pair, kind, k): score per layer with 95% bands, one panel per
        (instructions, label variant), the recognition layers marked; a matplotlib Figure. Filters left
        None match anything; exactly one figure must match."""
        groups = figures.curve_groups(self.analysed_curves())
        keys = sorted(groups)
        fields = ("task", "pair", "kind", "k")
        chosen = _only([dict(zip(fields, key)) for key in keys], dict(task=task, pair=pair, kind=kind, k=k), "curve")
        return figures.curve_figure(groups[keys[chosen]])

    def head_figure(
        self,
        task: str | None = None,
        pair: str | None = None,
        kind: str | None = None,
        condition: str | None = None,
        instructions: bool | None = None,
        k: int | None = None,
    ):
        """The report's layers x heads heatmap of one head sweep (score change per head, the recognition
        layer of the same cell's layer sweep dashed); a matplotlib Figure. Filters as ``curve_figure``."""
        maps = self.analysed_head_maps()
        wanted = dict(task=task, pair=pair, kind=kind, condition=condition, instructions=instructions, k=k)
        m = maps[_only([m.key for m in maps], wanted, "head sweep")]
        return figures.head_figure(m, figures.head_recognition(m, self.analysed_curves()))

    def atlas_figure(
        self, task: str | None = None, pair: str | None = None, k: int | None = None, instructions: bool | None = None
    ):
        """The report's depth atlas of one cell: every method's score / its own baseline per layer with 95%
        bands, the layer each points to with its interval; a matplotlib Figure. Filters as ``curve_figure``."""
        atlases = self.analysed_atlases()
        wanted = dict(task=task, pair=pair, k=k, instructions=instructions)
        return figures.atlas_figure(atlases[_only([a.key for a in atlases], wanted, "depth atlas cell")])

    def aie_figure(
        self, task: str | None = None, pair: str | None = None, k: int | None = None, instructions: bool | None = None
    ):
        """The report's heatmap of one cell's function-vector heads: each head's average indirect effect, the
        heads the function vector sums framed; a matplotlib Figure. Filters as ``curve_figure``."""
        atlases = [a for a in self.analysed_atlases() if a.aie is not None]
        wanted = dict(task=task, pair=pair, k=k, instructions=instructions)
        return figures.aie_figure(atlases[_only([a.key for a in atlases], wanted, "function-vector cell")])

    def lora_figure(self, pair: str | None = None):
        """The report's single-layer LoRA figure of ``pair`` (BLEU and validation loss per layer, against
        the masking curve); a matplotlib Figure."""
        with self._store() as store:
            lora = store.lora_results()
        pairs = sorted({r["pair"] for r in lora})
        chosen = pairs[_only([{"pair": p} for p in pairs], {"pair": pair}, "LoRA pair")]
        return figures.lora_figure(chosen, lora, self.analysed_curves())


def _frame(rows: list, columns: list[str] | None = None) -> pd.DataFrame:
    """A DataFrame of ``rows``. pandas is imported here, on first use: the model commands import the API
    (and so this module) but never build a DataFrame, and importing pandas costs them ~0.4 s."""
    import pandas as pd  # lazy: see the docstring

    return pd.DataFrame(rows, columns=columns)


def _flat_measurement(data: dict) -> dict:
    """A pruning measurement's plain values, the two runs' (full, pruned) prefixed with their name."""
    return _plain_values(data) | {
        f"{run}_{k}": v for run in ("full", "pruned") for k, v in _plain_values(data[run]).items()
    }


def _plain_values(values: dict) -> dict:
    """The entries that hold one number, string or None (not lists or dicts)."""
    return {k: v for k, v in values.items() if v is None or isinstance(v, (str, int, float))}


def _only(keys: Sequence[dict], wanted: dict, what: str) -> int:
    """The index of the one key that matches every value of ``wanted`` that is not None."""
    given = {f: v for f, v in wanted.items() if v is not None}
    matching = [i for i, key in enumerate(keys) if all(key.get(f) == v for f, v in given.items())]
    if len(matching) != 1:
        listed = "; ".join(", ".join(f"{f}={v!r}" for f, v in key.items()) for key in keys) or "none"
        raise UserError(f"{len(matching)} {what}s match {given or 'no filter'}; the store holds: {listed}")
    return matching[0]
