"""``icl-locate report STORE``: PNG figures and a self-contained HTML (or Markdown) report.

The figures come from ``figures``, the tables' rows from ``tables``; this module assembles them.
The HTML embeds every figure (base64), so it opens offline on its own; the PNG files sit beside it. It also
has an interactive Explore section (``explore`` gathers its data from the store, ``interactive`` inlines it
with plotly.js and the page's script): hover for intervals, click for the stored generations, filters.
"""

from __future__ import annotations

import base64
import html
from pathlib import Path

from ..util.errors import UserError
from ..util.fileio import ensure_dir, write_atomic
from ..util.system import hardware_line
from .analysis import DEFAULT_FRACTION, analyse_curve, analyse_head_map, load_curves, load_head_maps
from .atlas import load_atlases
from .explore import explore_data
from .figures import aie_figures, atlas_figures, curve_figures, head_figures, lora_figures
from .interactive import explore_section
from .tables import (
    ATLAS_HEADERS,
    ATLAS_INTRO,
    AUDIT_HEADERS,
    AUDIT_INTRO,
    HEAD_HEADERS,
    LABEL_HEADERS,
    LABEL_INTRO,
    LORA_HEADERS,
    PRUNING_HEADERS,
    SUMMARY_HEADERS,
    atlas_rows,
    audit_rows,
    fmt_cell,
    head_rows,
    label_rows,
    lora_rows,
    pruning_rows,
    summary_rows,
)

NO_CURVES = "No layer-masking curves in this store: its other results follow."


def build_report(
    store, out_dir: Path, fmt: str = "html", fraction: float = DEFAULT_FRACTION, n_boot: int = 1000
) -> Path:
    import matplotlib  # lazy: only the report plots, and matplotlib is a heavy import

    matplotlib.use("Agg")
    curves = [analyse_curve(c, fraction, n_boot) for c in load_curves(store)]
    heads = [analyse_head_map(m, n_boot) for m in load_head_maps(store)]
    atlases = load_atlases(store, n_boot, fraction=fraction, curves=curves)
    lora = store.lora_results()
    pruning = store.pruning_results()
    if not curves and not heads and not atlases and not lora and not pruning:
        raise UserError(f"store {store.path} holds no finished units yet")
    runs = store.runs()
    model = runs[-1]["provenance"].get("model", {}) if runs else {}
    num_layers = model.get("num_layers") or max(
        [max(c.layers) for c in curves]
        + [r["layer"] + 1 for r in lora]
        + [p["num_layers"] for p in pruning]
        + [max(m.layers) + 1 for m in heads]
        + [a.num_layers for a in atlases]
    )
    ensure_dir(out_dir)
    figures = (
        curve_figures(curves, out_dir) + head_figures(heads, curves, out_dir) + lora_figures(lora, curves, out_dir)
    )
    sections = dict(
        model=model,
        curves=curves,
        num_layers=num_layers,
        fraction=fraction,
        figures=figures,
        runs=runs,
        pruning=pruning_rows(pruning),
        heads=heads,
        lora=lora_rows(lora, curves),
        audit=audit_rows(store.audits()),
        labels=label_rows(curves),
        atlas=_atlas_section(atlases, out_dir, fraction),
    )
    if fmt == "html":
        text = _html(**sections, explore=explore_data(store, curves, heads, num_layers, fraction, n_boot))
    else:
        text = _markdown(**sections)
    path = out_dir / ("report.html" if fmt == "html" else "report.md")
    write_atomic(path, text)
    return path


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


def _atlas_section(atlases, out_dir: Path, fraction: float) -> dict | None:
    """The depth atlas's introduction, table rows and figures (each atlas, then its function-vector heads),
    or None where the store holds no atlas."""
    if not atlases:
        return None
    heatmaps = iter(aie_figures(atlases, out_dir))  # one per atlas with function-vector heads, in atlas order
    in_order = []
    for a, figure in zip(atlases, atlas_figures(atlases, out_dir)):
        in_order += [figure] + ([next(heatmaps)] if a.aie is not None else [])
    return dict(intro=ATLAS_INTRO.format(fraction=fraction), rows=atlas_rows(atlases), figures=in_order)


def _html_image(title: str, path: Path) -> str:
    """A titled figure embedded in the HTML (base64), so the report opens offline on its own."""
    data = base64.b64encode(path.read_bytes()).decode()
    return (
        f'<h3>{html.escape(title)}</h3><img alt="{path.name}" title="{path.name}" src="data:image/png;base64,{data}">'
    )


def _html(
    model, curves, num_layers, fraction, figures, runs, pruning, heads, lora, audit, labels, atlas, explore
) -> str:
    rows = summary_rows(curves, num_layers, fraction)
    table = "<table><tr>" + "".join(f"<th>{h}</th>" for _, h in SUMMARY_HEADERS) + "</tr>"
    for r in rows:
        table += "<tr>" + "".join(f"<td>{html.escape(fmt_cell(r[k]))}</td>" for k, _ in SUMMARY_HEADERS) + "</tr>"
    table += "</table>" if rows else f"</table><p>{NO_CURVES}</p>"
    curves_html = ""
    for c in curves:
        cells = "".join(
            f"<tr><td>{layer}</td><td>{s:.2f}</td><td>{lo:.2f}–{hi:.2f}</td></tr>"
            for layer, s, (lo, hi) in zip(c.layers, c.score, c.ci)
        )
        curves_html += (
            f"<details><summary>{html.escape(c.key['task'] + ' ' + c.key['pair'] + ': ' + c.label())}"
            f"</summary><table><tr><th>layer</th><th>{c.metric.name}</th><th>95% CI</th></tr>{cells}"
            f"</table></details>"
        )
    figs = "".join(_html_image(title, path) for title, path in figures)
    sections = ""
    if labels:
        sections += _html_table("Label variants", html.escape(LABEL_INTRO), LABEL_HEADERS, labels)
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
            head_rows(heads),
        )
    if atlas:
        sections += _html_table("Depth atlas", html.escape(atlas["intro"]), ATLAS_HEADERS, atlas["rows"])
        sections += "".join(_html_image(title, path) for title, path in atlas["figures"])
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
<h2>Summary</h2>{table}{explore_section(explore)}{sections}<h2>Figures</h2>{figs}<h2>Per-layer scores</h2>{curves_html}
<h2>Provenance</h2><pre>{html.escape(_provenance_text(prov, runs))}</pre></body></html>"""


def _markdown(model, curves, num_layers, fraction, figures, runs, pruning, heads, lora, audit, labels, atlas) -> str:
    rows = summary_rows(curves, num_layers, fraction)
    lines = [
        f"# Where does in-context learning happen? — {model.get('spec', '?')}",
        "",
        f"{model.get('architecture', '')}, {num_layers} layers; recognition threshold {fraction:.0%} of "
        f"baseline; 95% bootstrap intervals over items and seeds.",
        "",
        "## Summary",
        "",
        "| " + " | ".join(h for _, h in SUMMARY_HEADERS) + " |",
        "|" + "---|" * len(SUMMARY_HEADERS),
    ]
    lines += ["| " + " | ".join(fmt_cell(r[k]) for k, _ in SUMMARY_HEADERS) + " |" for r in rows]
    lines += [] if rows else ["", NO_CURVES]
    if labels:
        lines += _markdown_table("Label variants", LABEL_HEADERS, labels) + ["", LABEL_INTRO]
    if pruning:
        lines += _markdown_table("Context-pruned inference (measured)", PRUNING_HEADERS, pruning)
    if heads:
        lines += _markdown_table(
            "Heads (top heads per sweep; change vs reference, 95% CI)", HEAD_HEADERS, head_rows(heads)
        )
    if atlas:
        lines += _markdown_table("Depth atlas", ATLAS_HEADERS, atlas["rows"]) + ["", atlas["intro"], ""]
        lines += [f"![{title}]({path.name})" for title, path in atlas["figures"]]
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
        lines += [f"| {layer} | {s:.2f} | {lo:.2f}–{hi:.2f} |" for layer, s, (lo, hi) in zip(c.layers, c.score, c.ci)]
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
        f"drafts {choices['draft_tokens'] or 'off'} ({reasons['drafts']}); batch {_batch_words(choices)} "
        f"({reasons.get('batch', '?')}); on {hardware_line(choices['hardware'])}"
    )


def _batch_words(choices: dict) -> str:
    """As ``Choices.batch_line`` (engines/calibrate.py), from a stored record (older ones lack the scale)."""
    scale = choices.get("batch_scale", 1)
    return (
        str(choices["batch_size"])
        if choices.get("batch_size")
        else "auto"
        if scale == 1
        else f"{scale:g}x the rule's rows"
    )
