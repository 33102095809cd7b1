"""The report's tables as rows of text cells, one list of (key, header) per table: the summary per
curve, heads, single-layer LoRA, context-pruned inference, the depth atlas and the engine audit. Shared by the
HTML and the Markdown report."""

from __future__ import annotations

from ..core.labels import LABEL_VARIANTS
from .analysis import HeadMap, audit_disagreement, critical_layers, savings
from .atlas import Atlas


def recognition_curve(curves, pair: str):
    """The masking curve of ``pair`` whose recognition layer the LoRA results are read against
    (instructions+examples with instructions first, as in the paper), or None."""
    masked = [
        c
        for c in curves
        if c.key["kind"] == "mask" and c.key["pair"] == pair and not c.converse and c.key.get("labels") == "gold"
    ]

    def preference(c) -> tuple:
        return (
            c.recognition is None,
            not c.key["instructions"],
            c.key["condition"] != "instructions+examples",
            c.key["condition"],
        )

    return sorted(masked, key=preference)[0] if masked else None


LORA_HEADERS = [
    ("pair", "pair"),
    ("layer", "layer"),
    ("bleu", "zero-shot BLEU"),
    ("epochs", "epochs"),
    ("val", "best val loss"),
    ("loss", "loss on"),
    ("rate", "train tokens/s"),
    ("seconds", "seconds"),
    ("vs", "vs recognition layer"),
]


def lora_rows(lora: list[dict], curves) -> list[dict]:
    rows = []
    for r in sorted(lora, key=lambda r: (r["pair"], r["layer"])):
        c = recognition_curve(curves, r["pair"])
        recognition = None if c is None else c.recognition
        seconds = r.get("train_seconds")
        rows.append(
            dict(
                pair=r["pair"],
                layer=str(r["layer"]),
                bleu=f"{r['bleu']:.2f}",
                epochs=str(len(r.get("train_loss", []))),
                val="—" if r.get("best_val_loss") is None else f"{r['best_val_loss']:.4f}",
                loss=r.get("settings", {}).get("loss", "full"),
                rate="—" if not seconds else f"{r.get('sequence_tokens', r['train_tokens']) / seconds:.0f}",
                seconds="—" if r.get("seconds") is None else f"{r['seconds']:.0f}",
                vs="—"
                if recognition is None
                else ("before" if r["layer"] < recognition else "at" if r["layer"] == recognition else "after"),
            )
        )
    return rows


HEAD_HEADERS = [
    ("cell", "task"),
    ("what", "sweep"),
    ("reference", "reference score"),
    ("head", "layer / head"),
    ("change", "change (95% CI)"),
]


def head_rows(maps: list[HeadMap], n: int = 5) -> list[dict]:
    rows = []
    for m in maps:
        ref = (
            "baseline " if m.key["kind"] == "knockout" else f"masked from {m.key['from_layer']}: "
        ) + f"{m.reference_score:.2f}"
        for layer, head, change, (lo, hi) in m.top(n):
            rows.append(
                dict(
                    cell=f"{m.key['task']} {m.key['pair']}".strip(),
                    what=m.label(),
                    reference=ref,
                    head=f"{layer} / {head}",
                    change=f"{change:+.2f} ({lo:+.2f} to {hi:+.2f})",
                )
            )
    return rows


def summary_rows(curves, num_layers, fraction):
    rows = []
    for c in curves:
        s = savings(c, num_layers)
        rows.append(
            dict(
                cell=f"{c.key['task']} {c.key['pair']}".strip(),
                what=c.label(),
                seeds=len(c.seeds),
                items=c.item_stats.shape[2],
                metric=c.metric.name,
                baseline=c.baseline,
                recognition=(
                    "—"
                    if c.key["kind"] != "mask"
                    else c.verdict
                    if c.recognition is None or c.converse
                    else f"{c.recognition} (95% CI {c.recognition_ci[0]:.0f}–{c.recognition_ci[1]:.0f})"
                ),
                critical=", ".join(map(str, critical_layers(c, fraction))) if c.key["kind"] == "ablation" else "—",
                savings="—" if s is None else f"{100 * s.paper_formula:.1f}% / {100 * s.token_exact:.1f}%",
            )
        )
    return rows


SUMMARY_HEADERS = [
    ("cell", "task"),
    ("what", "condition"),
    ("seeds", "seeds"),
    ("items", "test items"),
    ("metric", "metric"),
    ("baseline", "baseline"),
    ("recognition", "recognition layer"),
    ("critical", "critical layers"),
    ("savings", "savings: paper formula / exact tokens"),
]


PRUNING_HEADERS = [
    ("cell", "task"),
    ("condition", "pruned context"),
    ("layer", "r / L"),
    ("requests", "requests (batch)"),
    ("device", "device"),
    ("flops", "FLOPs saved: prompts / all"),
    ("time", "time saved: prompts / all"),
    ("kv", "KV cache saved"),
    ("quality", "score: full → pruned"),
    ("identical", "= masking from r"),
]


LABEL_HEADERS = [
    ("cell", "task"),
    ("condition", "condition"),
    ("labels", "labels"),
    ("baseline", "score, nothing hidden (95% CI)"),
    ("floor", "score, hidden from layer 0"),
    ("vs_gold", "vs gold"),
    ("recognition", "recognition layer"),
]
LABEL_INTRO = (
    "Task recognition vs task learning (Pan et al., 2023): the same prompts with the examples' answers "
    "gold, random (drawn from the label set, or other bank answers), shuffled among the examples, or "
    "abstract (labels mapped to meaningless symbols; the references mapped alike). Random or shuffled "
    "labels that keep the gold score mean the examples serve to recognise the task; an abstract score "
    "above chance means the model learns the mapping from the examples."
)


def label_rows(curves) -> list[dict]:
    """One row per layer-from masking curve of a cell swept under several label variants, gold first."""
    cells: dict[tuple, list] = {}
    for c in curves:
        if c.key["kind"] == "mask" and not c.converse:
            cell = tuple(c.key[f] for f in ("task", "pair", "condition", "instructions", "k", "n_test", "data"))
            cells.setdefault(cell, []).append(c)
    rows = []
    for group in cells.values():
        if len({c.key.get("labels", "gold") for c in group}) < 2:
            continue
        group.sort(key=lambda c: LABEL_VARIANTS.index(c.key.get("labels", "gold")))
        gold = next((c for c in group if c.key.get("labels", "gold") == "gold"), None)
        for c in group:
            lo, hi = c.ci[-1]
            rows.append(
                dict(
                    cell=f"{c.key['task']} {c.key['pair']}".strip(),
                    condition=f"{c.key['condition']} ({'instr' if c.key['instructions'] else 'no instr'}, "
                    f"k={c.key['k']})",
                    labels=c.key.get("labels", "gold"),
                    baseline=f"{c.baseline:.1f} ({lo:.1f}–{hi:.1f})",
                    floor=f"{c.score[0]:.1f}",
                    vs_gold="—" if gold is None or c is gold else f"{c.baseline - gold.baseline:+.1f}",
                    recognition=c.verdict.removeprefix("recognition layer "),
                )
            )
    return rows


def pruning_rows(results: list[dict]) -> list[dict]:
    """Measured context-pruned inference (icl-locate prune), one row per measurement."""
    rows = []
    for d in results:
        full, pruned = d["full"], d["pruned"]
        identical = d.get("identical_to_masked")
        rows.append(
            dict(
                cell=f"{d['task']} {d['pair']}",
                condition=d["condition"],
                layer=f"{d['from_layer']} / {d['num_layers']}",
                requests=f"{d['sentences']} ({d['batch_size']})",
                device=f"{d['device']} {d['dtype']}",
                flops=f"{100 * d['flops_saved_prompt']:.1f}% / {100 * d['flops_saved_total']:.1f}%",
                time=f"{100 * d['time_saved_prefill']:.1f}% / {100 * d['time_saved_total']:.1f}%",
                kv=f"{100 * d['kv_saved']:.1f}%",
                quality=f"{d['metric']} {full['score']:.2f} → {pruned['score']:.2f}",
                identical="—" if identical is None else f"{identical}/{d['sentences']}" + _settled(d),
            )
        )
    return rows


def _settled(measurement: dict) -> str:
    """What settled the pruning check where the store's sweep rows did some of it (the rest: the fast engine)."""
    stored = measurement.get("checked_by_store")
    return f" ({stored} by the sweep's stored rows)" if stored else ""


AUDIT_HEADERS = [
    ("unit", "unit"),
    ("what", "rows"),
    ("agree", "agree with the reference engine"),
    ("disagreements", "disagreements: item, row, first differing token, reference margin (threshold)"),
]
AUDIT_INTRO = (
    "After each unit a few of its rows, drawn at random with a stored seed, are decoded again by the "
    "reference engine (one prompt at a time, the model's own LM head, same dtype and device). A "
    "disagreement at a reference top-1/top-2 logit margin below the dtype's threshold is a near-tie "
    "(rounding); above it, an ENGINE FAULT."
)


def audit_rows(audited: list[dict]) -> list[dict]:
    """One row per audited unit: its agreement and every disagreement with its margin."""
    by_unit: dict[str, list[dict]] = {}
    for a in audited:
        by_unit.setdefault(a["unit_id"], []).append(a)
    rows = []
    for unit_id, checked in by_unit.items():
        spec = checked[0]["spec"]
        what = " ".join(str(spec.get(k) or "") for k in ("task", "pair", "kind", "condition")).split()
        notes = [audit_disagreement(a) for a in checked if not a["agree"]]
        rows.append(
            dict(
                unit=unit_id,
                what=" ".join(what),
                agree=f"{sum(a['agree'] for a in checked)}/{len(checked)}",
                disagreements="; ".join(notes) or "none",
            )
        )
    return rows


def fmt_cell(v):
    return f"{v:.2f}" if isinstance(v, float) else str(v)


ATLAS_HEADERS = [
    ("cell", "task"),
    ("method", "method"),
    ("point", "points to layer"),
    ("interval", "95% interval"),
    ("what", "what"),
    ("baseline", "baseline"),
]
ATLAS_INTRO = (
    "Every way of locating in-context learning in this store on one layer axis, each score divided by the "
    "method's own baseline (1 = the baseline). Masking: the context hidden from layer j on, against nothing "
    "masked; points to the recognition layer. Task and function vectors: the vector patched at layer l into "
    "the zero-shot prompt, against the ICL prompt (the zero-shot prompt dotted); point to the best layer. "
    "Logit lens: the final norm and LM head applied at layer l, the share of items whose answer's first token "
    "is top-1, against the model's own output, with the context visible and hidden (each further masking "
    "condition's hidden lens dotted); points to the first layer "
    "from which the answer stays top-1 (at least {fraction:.0%} of the last layer's rate). Bands and intervals: "
    "95% bootstrap over test items and seeds. Function-vector heads: each head's average indirect effect (the "
    "answer's probability on label-shuffled prompts with the head's output replaced by its mean over clean "
    "prompts, minus without); the heads the function vector sums framed."
)


def atlas_rows(atlases: list[Atlas]) -> list[dict]:
    """One row per (atlas, method): the layer the method points to, its interval, what it is, its baseline."""
    rows = []
    for a in atlases:
        instructions = "instr" if a.key["instructions"] else "no instr"
        for m in a.methods.values():
            rows.append(
                dict(
                    cell=f"{a.key['task']} {a.key['pair']} (k={a.key['k']}, {instructions})".replace("  ", " "),
                    method=m.method,
                    point="—" if m.point is None else str(m.point),
                    interval="—" if m.interval is None else f"{m.interval[0]:.0f}–{m.interval[1]:.0f}",
                    what=m.what,
                    baseline=f"{m.baseline:.2f} ({m.baseline_what})",
                )
            )
    return rows
