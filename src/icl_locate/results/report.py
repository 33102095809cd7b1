"""``icl-locate report STORE``: PNG figures and a self-contained HTML (or Markdown) report.

Figures follow the paper's Figs 2-4: score per masking layer, one line per condition, the
unmasked baseline dashed, 95% bootstrap bands, the recognition layer marked. The HTML embeds
every figure (base64), so it opens offline on its own; the PNG files sit beside it.
"""

from __future__ import annotations

import base64
import html
from collections import defaultdict
from pathlib import Path

import numpy as np

from ..util.errors import UserError
from ..util.fileio import ensure_dir, write_atomic
from ..util.system import hardware_line
from .analysis import (
    DEFAULT_FRACTION,
    HeadMap,
    analyse_curve,
    analyse_head_map,
    audit_disagreement,
    critical_layers,
    load_curves,
    load_head_maps,
    savings,
)


def build_report(
    store, out_dir: Path, fmt: str = "html", fraction: float = DEFAULT_FRACTION, n_boot: int = 1000
) -> Path:
    import matplotlib  # lazy: plotting is only needed here, and its import costs about a second

    matplotlib.use("Agg")
    curves = [analyse_curve(c, fraction, n_boot) for c in load_curves(store)]
    heads = [analyse_head_map(m, n_boot) for m in load_head_maps(store)]
    lora = store.lora_results()
    pruning = store.pruning_results()
    if not curves and not heads and not lora and not pruning:
        raise UserError(f"store {store.path} holds no finished units yet")
    runs = store.runs()
    model = runs[-1]["provenance"].get("model", {}) if runs else {}
    num_layers = model.get("num_layers") or max(
        [max(c.layers) for c in curves]
        + [r["layer"] + 1 for r in lora]
        + [p["num_layers"] for p in pruning]
        + [max(m.layers) + 1 for m in heads]
    )
    ensure_dir(out_dir)
    figures = _figures(curves, out_dir) + _head_figures(heads, curves, out_dir) + _lora_figures(lora, curves, out_dir)
    sections = dict(
        model=model,
        curves=curves,
        num_layers=num_layers,
        fraction=fraction,
        figures=figures,
        runs=runs,
        pruning=_pruning_rows(pruning),
        heads=heads,
        lora=_lora_rows(lora, curves),
        audit=_audit_rows(store.audits()),
    )
    text = _html(**sections) if fmt == "html" else _markdown(**sections)
    path = out_dir / ("report.html" if fmt == "html" else "report.md")
    write_atomic(path, text)
    return path


def _group(curves):
    groups = defaultdict(list)
    for c in curves:
        groups[(c.key["task"], c.key["pair"], c.key["kind"], c.key["k"])].append(c)
    return groups


def _figures(curves, out_dir: Path) -> list[tuple[str, Path]]:
    import matplotlib.pyplot as plt  # lazy: see build_report
    from matplotlib.ticker import MaxNLocator  # lazy: see build_report

    figures = []
    for (task, pair, kind, k), group in sorted(_group(curves).items()):
        by_instr = defaultdict(list)
        for c in group:
            by_instr[c.key["instructions"]].append(c)
        fig, axes = plt.subplots(1, len(by_instr), figsize=(6 * len(by_instr), 4), squeeze=False)
        for ax, (instr, cs) in zip(axes[0], sorted(by_instr.items(), reverse=True)):
            for c in sorted(cs, key=lambda c: c.key["condition"]):
                lo, hi = zip(*c.ci)
                name = c.key["condition"] if kind == "mask" else "attention of layer removed"
                (line,) = ax.plot(c.layers, c.score, marker="o", ms=3, label=name)
                ax.fill_between(c.layers, lo, hi, color=line.get_color(), alpha=0.15)
                if c.recognition is not None and c.recognition < c.layers[-1]:
                    ax.axvline(c.recognition, color=line.get_color(), ls=":", lw=1)
            ax.axhline(cs[0].baseline, color="black", ls="--", lw=1, label="baseline (no mask)")
            ax.set_xlabel("layer masked from" if kind == "mask" else "ablated layer")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.set_ylabel(cs[0].metric.label)
            ax.set_title(f"{task} {pair} k={k} — {'with' if instr else 'without'} instructions", fontsize=10)
            ax.legend(fontsize=7)
            ax.grid(alpha=0.3)
        fig.tight_layout()
        name = f"{kind}_{task}_{pair or 'all'}_k{k}.png".replace("/", "-")
        path = out_dir / name
        fig.savefig(path, dpi=110)
        plt.close(fig)
        figures.append((f"{'Masking' if kind == 'mask' else 'Layer ablation'}: {task} {pair} k={k}", path))
    return figures


def _recognition_curve(curves, pair: str):
    """The masking curve of ``pair`` whose recognition layer the LoRA results are read against
    (instructions+examples with instructions first, as in the paper), or None."""
    masked = [c for c in curves if c.key["kind"] == "mask" and c.key["pair"] == pair]

    def preference(c) -> tuple:
        return (
            c.recognition is None,
            not c.key["instructions"],
            c.key["condition"] != "instructions+examples",
            c.key["condition"],
        )

    return sorted(masked, key=preference)[0] if masked else None


def _lora_figures(lora: list[dict], curves, out_dir: Path) -> list[tuple[str, Path]]:
    """Per layer: zero-shot BLEU of single-layer LoRA and the masking curve of the same pair on one
    BLEU axis, the best validation loss on a second axis, the recognition layer marked."""
    import matplotlib.pyplot as plt  # lazy: see build_report
    from matplotlib.ticker import MaxNLocator  # lazy: see build_report

    figures = []
    for pair in sorted({r["pair"] for r in lora}):
        rows = sorted((r for r in lora if r["pair"] == pair), key=lambda r: r["layer"])
        fig, ax = plt.subplots(figsize=(7, 4.6))
        layers = [r["layer"] for r in rows]
        ax.plot(layers, [r["bleu"] for r in rows], marker="o", color="tab:blue", label="LoRA on this layer only: BLEU")
        c = _recognition_curve(curves, pair)
        if c is not None:
            ax.plot(
                c.layers,
                c.score,
                marker=".",
                ms=3,
                color="tab:gray",
                label=f"masking {c.label()} from this layer: {c.metric.label}",
            )
            if c.recognition is not None:
                ax.axvline(c.recognition, color="red", ls="--", label=f"recognition layer {c.recognition}")
        ax.set_xlabel("layer")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel("zero-shot BLEU (LoRA) / score (masking)")
        handles, labels = ax.get_legend_handles_labels()
        losses = [(r["layer"], r.get("best_val_loss")) for r in rows if r.get("best_val_loss") is not None]
        if losses:
            twin = ax.twinx()
            twin.plot(*zip(*losses), marker="s", ms=4, ls=":", color="tab:orange", label="LoRA: best validation loss")
            twin.set_ylabel("best validation loss")
            more, more_labels = twin.get_legend_handles_labels()
            handles, labels = handles + more, labels + more_labels
        # below the axes: inside, it hides points of the curves (they span the whole plot)
        ax.legend(handles, labels, fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2)
        ax.set_title(f"single-layer LoRA, {pair}", fontsize=10)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        path = out_dir / f"lora_{pair}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        figures.append((f"Single-layer LoRA: {pair}", path))
    return figures


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


def _lora_rows(lora: list[dict], curves) -> list[dict]:
    rows = []
    for r in sorted(lora, key=lambda r: (r["pair"], r["layer"])):
        c = _recognition_curve(curves, r["pair"])
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


def _cell(key: dict) -> tuple:
    return key["task"], key["pair"], key["condition"], key["instructions"], key["k"]


def _head_figures(maps: list[HeadMap], curves, out_dir: Path) -> list[tuple[str, Path]]:
    """One layers x heads heatmap per head sweep: the score change of each single head's intervention."""
    import matplotlib.pyplot as plt  # lazy: see build_report

    recognition = {_cell(c.key): c.recognition for c in curves if c.key["kind"] == "mask"}
    figures = []
    for m in maps:
        bound = float(np.abs(m.delta).max()) or 1.0
        fig, ax = plt.subplots(figsize=(max(4.0, 0.6 * len(m.heads) + 2.5), max(3.5, 0.28 * len(m.layers) + 1.5)))
        image = ax.imshow(
            m.delta,
            cmap="RdBu",
            vmin=-bound,
            vmax=bound,
            aspect="auto",
            origin="lower",
            extent=(m.heads[0] - 0.5, m.heads[-1] + 0.5, m.layers[0] - 0.5, m.layers[-1] + 0.5),
        )
        fig.colorbar(
            image,
            ax=ax,
            label=f"{m.metric.label} change vs "
            + ("baseline" if m.key["kind"] == "knockout" else f"masked from {m.key['from_layer']}"),
        )
        r = recognition.get(_cell(m.key))
        if r is not None:
            ax.axhline(r - 0.5, color="black", ls="--", lw=1, label=f"recognition layer {r}")
            ax.legend(fontsize=7, loc="upper right")
        ax.set_xlabel("query head")
        ax.set_ylabel("layer")
        ax.set_xticks(m.heads)
        ax.set_title(f"{m.key['task']} {m.key['pair']}\n{m.label()}", fontsize=8)
        fig.tight_layout()
        path = out_dir / (
            f"heads_{m.key['kind']}_{m.key['task']}_{m.key['pair'] or 'all'}_{m.key['condition']}_"
            f"k{m.key['k']}{'' if m.key['instructions'] else '_noinstr'}.png"
        ).replace("/", "-")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        figures.append((f"Heads: {m.key['task']} {m.key['pair']} {m.label()}", path))
    return figures


HEAD_HEADERS = [
    ("cell", "task"),
    ("what", "sweep"),
    ("reference", "reference score"),
    ("head", "layer / head"),
    ("change", "change (95% CI)"),
]


def _head_rows(maps: list[HeadMap], n: int = 5) -> list[dict]:
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


def _rows(curves, num_layers, fraction):
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
                    if c.recognition is None
                    else f"{c.recognition} (95% CI {c.recognition_ci[0]:.0f}–{c.recognition_ci[1]:.0f})"
                ),
                critical=", ".join(map(str, critical_layers(c, fraction))) if c.key["kind"] == "ablation" else "—",
                savings="—" if s is None else f"{100 * s.paper_formula:.1f}% / {100 * s.token_exact:.1f}%",
            )
        )
    return rows


HEADERS = [
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


def _pruning_rows(results: list[dict]) -> list[dict]:
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
                identical="—" if identical is None else f"{identical}/{d['sentences']}",
            )
        )
    return rows


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


def _audit_rows(audited: list[dict]) -> list[dict]:
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


def _fmt(v):
    return f"{v:.2f}" if isinstance(v, float) else str(v)


def _html_table(title: str, intro: str, headers: list[tuple[str, str]], rows: list[dict]) -> str:
    """A titled HTML section: an introduction (HTML) and one table row per dict (text, escaped)."""
    out = f"<h2>{title}</h2><p>{intro}</p><table><tr>" + "".join(f"<th>{h}</th>" for _, h in headers) + "</tr>"
    for r in rows:
        out += "<tr>" + "".join(f"<td>{html.escape(r[k])}</td>" for k, _ in headers) + "</tr>"
    return out + "</table>"


def _markdown_table(title: str, headers: list[tuple[str, str]], rows: list[dict]) -> list[str]:
    return ["", f"## {title}", "", "| " + " | ".join(h for _, h in headers) + " |", "|" + "---|" * len(headers)] + [
        "| " + " | ".join(r[k] for k, _ in headers) + " |" for r in rows
    ]


def _html(model, curves, num_layers, fraction, figures, runs, pruning, heads, lora, audit) -> str:
    rows = _rows(curves, num_layers, fraction)
    table = "<table><tr>" + "".join(f"<th>{h}</th>" for _, h in HEADERS) + "</tr>"
    for r in rows:
        table += "<tr>" + "".join(f"<td>{html.escape(_fmt(r[k]))}</td>" for k, _ in HEADERS) + "</tr>"
    table += "</table>"
    curves_html = ""
    for c in curves:
        cells = "".join(
            f"<tr><td>{l}</td><td>{s:.2f}</td><td>{lo:.2f}–{hi:.2f}</td></tr>"
            for l, s, (lo, hi) in zip(c.layers, c.score, c.ci)
        )
        curves_html += (
            f"<details><summary>{html.escape(c.key['task'] + ' ' + c.key['pair'] + ': ' + c.label())}"
            f"</summary><table><tr><th>layer</th><th>{c.metric.name}</th><th>95% CI</th></tr>{cells}"
            f"</table></details>"
        )
    figs = ""
    for title, path in figures:
        data = base64.b64encode(path.read_bytes()).decode()
        figs += (
            f'<h3>{html.escape(title)}</h3><img alt="{path.name}" title="{path.name}" '
            f'src="data:image/png;base64,{data}">'
        )
    sections = ""
    if pruning:
        sections += _html_table(
            "Context-pruned inference (measured)",
            "The context is processed in layers &lt; r only and its keys/values are dropped from "
            "r on, against full processing of the same requests by the same code "
            "(icl-locate prune).",
            PRUNING_HEADERS,
            pruning,
        )
    if heads:
        sections += _html_table(
            "Heads",
            "Knockout hides the context from one head at one layer (every other head "
            "sees it); restoration hides it from layer j on, but not from one head. The change is "
            "the score against the unmasked baseline (knockout: negative = the task needs that "
            "head) or against everything hidden from j (restoration: positive = that head alone "
            "brings the task back). Top heads, 95% bootstrap intervals over items and seeds:",
            HEAD_HEADERS,
            _head_rows(heads),
        )
    if lora:
        sections += _html_table(
            "Single-layer LoRA",
            "One adapter on one layer's attention output projection; "
            "zero-shot BLEU after training, and where the layer sits against the recognition "
            "layer of this store's masking curve of the same pair.",
            LORA_HEADERS,
            lora,
        )
    if audit:
        sections += _html_table("Audit: engine vs reference engine", html.escape(AUDIT_INTRO), AUDIT_HEADERS, audit)
    prov = runs[-1]["provenance"] if runs else {}
    return f"""<!DOCTYPE html><html><head><meta charset="utf-8"><title>icl-locate report</title>
<style>body{{font-family:sans-serif;max-width:1200px;margin:2em auto}}table{{border-collapse:collapse;margin:1em 0}}
td,th{{border:1px solid #ccc;padding:3px 8px;font-size:13px}}img{{max-width:100%}}</style></head><body>
<h1>Where does in-context learning happen? — {html.escape(str(model.get("spec", "?")))}</h1>
<p>{html.escape(str(model.get("architecture", "")))}, {num_layers} layers. Recognition layer: the first layer
from which masking the context keeps the score at or above {fraction:.0%} of the unmasked baseline for every
later layer. Savings: share of prompt processing saved by dropping the context after that layer,
(L − r)/L · k/(k+1) as in the paper, and with the exact context/query token counts of these prompts.
Intervals are 95% bootstrap intervals over test items and seeds.</p>
<h2>Summary</h2>{table}{sections}<h2>Figures</h2>{figs}<h2>Per-layer scores</h2>{curves_html}
<h2>Provenance</h2><pre>{html.escape(_provenance_text(prov, runs))}</pre></body></html>"""


def _markdown(model, curves, num_layers, fraction, figures, runs, pruning, heads, lora, audit) -> str:
    rows = _rows(curves, num_layers, fraction)
    lines = [
        f"# Where does in-context learning happen? — {model.get('spec', '?')}",
        "",
        f"{model.get('architecture', '')}, {num_layers} layers; recognition threshold {fraction:.0%} of "
        f"baseline; 95% bootstrap intervals over items and seeds.",
        "",
        "## Summary",
        "",
        "| " + " | ".join(h for _, h in HEADERS) + " |",
        "|" + "---|" * len(HEADERS),
    ]
    lines += ["| " + " | ".join(_fmt(r[k]) for k, _ in HEADERS) + " |" for r in rows]
    if pruning:
        lines += _markdown_table("Context-pruned inference (measured)", PRUNING_HEADERS, pruning)
    if heads:
        lines += _markdown_table(
            "Heads (top heads per sweep; change vs reference, 95% CI)", HEAD_HEADERS, _head_rows(heads)
        )
    if lora:
        lines += _markdown_table("Single-layer LoRA", LORA_HEADERS, lora)
    if audit:
        lines += _markdown_table("Audit: engine vs reference engine", AUDIT_HEADERS, audit) + ["", AUDIT_INTRO]
    lines += ["", "## Figures", ""] + [f"![{title}]({path.name})" for title, path in figures]
    for c in curves:
        lines += [
            "",
            f"### {c.key['task']} {c.key['pair']}: {c.label()}",
            "",
            f"| layer | {c.metric.name} | 95% CI |",
            "|---|---|---|",
        ]
        lines += [f"| {l} | {s:.2f} | {lo:.2f}–{hi:.2f} |" for l, s, (lo, hi) in zip(c.layers, c.score, c.ci)]
    lines += ["", "## Provenance", "", "```", _provenance_text(runs[-1]["provenance"] if runs else {}, runs), "```"]
    return "\n".join(lines) + "\n"


def _provenance_text(prov: dict, runs: list) -> str:
    keep = {k: prov.get(k) for k in ("icl_locate", "python", "torch", "transformers", "platform")}
    lines = [f"{k}: {v}" for k, v in keep.items()]
    lines += [f"data {p}: sha256 {h}" for p, h in (prov.get("data_files") or {}).items()]
    for r in runs:
        lines.append(f"run {r['run_id']}: {r['command']}")
        lines += [f"  {engine_line(e)}" for e in r["provenance"].get("engines", [])]
    return "\n".join(lines)


def engine_line(choices: dict) -> str:
    """An engine configuration a run used, its measured reasons and the machine (see engines/calibrate.py)."""
    reasons = choices["reasons"]
    return (
        f"engine {choices['engine']} ({reasons['engine']}); head {choices['head']} ({reasons['head']}); "
        f"drafts {choices['draft_tokens'] or 'off'} ({reasons['drafts']}); on {hardware_line(choices['hardware'])}"
    )
