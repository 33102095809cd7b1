"""The report's figures, after the paper's Figs 2-4: score per masking layer (one line per condition,
the unmasked baseline dashed, 95% bootstrap bands, the recognition layer marked), head heatmaps and
single-layer LoRA against the masking curve; the depth atlas (every locating method on one layer axis) and
its function-vector heads. Each is drawn as a matplotlib Figure (``curve_figure``, ``head_figure``,
``lora_figure``, ``atlas_figure``, ``aie_figure``: what the Python API returns) and written as a PNG beside
the report."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import numpy as np

from ..core.labels import LABEL_VARIANTS
from .analysis import HeadMap
from .atlas import FURTHER_LENS, Atlas
from .tables import recognition_curve


def curve_groups(curves) -> dict[tuple, list]:
    """The curves drawn in one figure, by (task, pair, kind, k): the panels of one figure."""
    groups = defaultdict(list)
    for c in curves:
        groups[(c.key["task"], c.key["pair"], c.key["kind"], c.key["k"])].append(c)
    return dict(groups)


def curve_title(task: str, pair: str, kind: str, k: int) -> str:
    """The title a curve figure goes by in the report."""
    cell = " ".join(part for part in (task, pair, f"k={k}") if part)  # a task without pairs: no double space
    return f"{'Masking' if kind == 'mask' else 'Layer ablation'}: {cell}"


def curve_figures(curves, out_dir: Path) -> list[tuple[str, Path]]:
    """Every curve figure (``curve_figure``) written as a PNG in ``out_dir``: (title, path) each."""
    import matplotlib.pyplot as plt  # lazy: plotting is only needed for the report

    figures = []
    for (task, pair, kind, k), group in sorted(curve_groups(curves).items()):
        fig = curve_figure(group)
        path = out_dir / f"{kind}_{task}_{pair or 'all'}_k{k}.png".replace("/", "-")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        figures.append((curve_title(task, pair, kind, k), path))
    return figures


def curve_figure(group):
    """The curves of one (task, pair, kind, k) (``curve_groups``), a matplotlib Figure: one panel per
    (instructions, label variant), label variants side by side, gold first."""
    import matplotlib.pyplot as plt  # lazy: plotting is only needed for the report
    from matplotlib.ticker import MaxNLocator  # lazy: plotting is only needed for the report

    task, pair, kind, k = (group[0].key[f] for f in ("task", "pair", "kind", "k"))
    by_panel = defaultdict(list)
    for c in group:
        by_panel[(not c.key["instructions"], LABEL_VARIANTS.index(c.key.get("labels", "gold")))].append(c)
    several_labels = len({c.key.get("labels", "gold") for c in group}) > 1
    fig, axes = plt.subplots(1, len(by_panel), figsize=(6 * len(by_panel), 4), squeeze=False)
    for ax, (_, cs) in zip(axes[0], sorted(by_panel.items())):
        instr = cs[0].key["instructions"]
        for c in sorted(cs, key=lambda c: c.key["condition"]):
            lo, hi = zip(*c.ci)
            name = c.key["condition"] if kind == "mask" else "attention of layer removed"
            name = f"{name.removesuffix('-below')} (hidden below j)" if c.converse else name
            (line,) = ax.plot(c.layers, c.score, marker="o", ms=3, label=name)
            ax.fill_between(c.layers, lo, hi, color=line.get_color(), alpha=0.15)
            if c.recognition is not None and c.recognition < c.layers[-1]:
                ax.axvline(c.recognition, color=line.get_color(), ls=":", lw=1)
        ax.axhline(cs[0].baseline, color="black", ls="--", lw=1, label="baseline (no mask)")
        ax.set_xlabel("layer j masked from (or below)" if kind == "mask" else "ablated layer")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(cs[0].metric.label)
        labels = f", {cs[0].key.get('labels', 'gold')} labels" if several_labels else ""
        title = f"{task} {pair} k={k} — {'with' if instr else 'without'} instructions{labels}"
        ax.set_title(title, fontsize=10)
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def lora_figures(lora: list[dict], curves, out_dir: Path) -> list[tuple[str, Path]]:
    """Every pair's LoRA figure (``lora_figure``) written as a PNG in ``out_dir``: (title, path) each."""
    import matplotlib.pyplot as plt  # lazy: plotting is only needed for the report

    figures = []
    for pair in sorted({r["pair"] for r in lora}):
        fig = lora_figure(pair, lora, curves)
        path = out_dir / f"lora_{pair}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        figures.append((f"Single-layer LoRA: {pair}", path))
    return figures


def lora_figure(pair: str, lora: list[dict], curves):
    """Per layer: zero-shot BLEU of single-layer LoRA and the masking curve of the same pair on one
    BLEU axis, the best validation loss on a second axis, the recognition layer marked; a matplotlib
    Figure of ``pair``'s rows of ``lora`` (``Store.lora_results``)."""
    import matplotlib.pyplot as plt  # lazy: plotting is only needed for the report
    from matplotlib.ticker import MaxNLocator  # lazy: plotting is only needed for the report

    rows = sorted((r for r in lora if r["pair"] == pair), key=lambda r: r["layer"])
    fig, ax = plt.subplots(figsize=(7, 4.6))
    layers = [r["layer"] for r in rows]
    ax.plot(layers, [r["bleu"] for r in rows], marker="o", color="tab:blue", label="LoRA on this layer only: BLEU")
    c = recognition_curve(curves, pair)
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
    return fig


def _cell(key: dict) -> tuple:
    return key["task"], key["pair"], key["condition"], key["instructions"], key["k"]


def head_recognition(m: HeadMap, curves) -> int | None:
    """The recognition layer of the layer sweep of ``m``'s cell among ``curves`` (analysed), or None."""
    recognition = {_cell(c.key): c.recognition for c in curves if c.key["kind"] == "mask"}
    return recognition.get(_cell(m.key))


def head_figures(maps: list[HeadMap], curves, out_dir: Path) -> list[tuple[str, Path]]:
    """One layers x heads heatmap per head sweep: the score change of each single head's intervention."""
    import matplotlib.pyplot as plt  # lazy: plotting is only needed for the report

    figures = []
    for m in maps:
        fig = head_figure(m, head_recognition(m, curves))
        path = out_dir / (
            f"heads_{m.key['kind']}_{m.key['task']}_{m.key['pair'] or 'all'}_{m.key['condition']}_"
            f"k{m.key['k']}{'' if m.key['instructions'] else '_noinstr'}.png"
        ).replace("/", "-")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        figures.append((f"Heads: {m.key['task']} {m.key['pair']} {m.label()}", path))
    return figures


def head_figure(m: HeadMap, recognition: int | None):
    """The heatmap of one head sweep, a matplotlib Figure (``heatmap_figure``)."""
    reference = "baseline" if m.key["kind"] == "knockout" else f"masked from {m.key['from_layer']}"
    return heatmap_figure(m, f"{m.metric.label} change vs {reference}", recognition)


def heatmap_figure(m: HeadMap, colour_label: str, recognition: int | None, marked: int = 0):
    """``m.delta`` per (layer, head) as a heatmap, a matplotlib Figure; the recognition layer dashed, the
    first ``marked`` heads of ``m.top`` framed. Head sweeps and function-vector heads alike.

    Cells sit at row/column indices labelled with the layer and head numbers they hold, so the
    ticks are the swept layers and heads whatever their spacing (``--layers 8,9`` or ``0,4,8``).
    """
    import matplotlib.pyplot as plt  # lazy: plotting is only needed for the report
    from matplotlib.patches import Rectangle  # lazy: plotting is only needed for the report

    bound = float(np.abs(m.delta).max()) or 1.0
    fig, ax = plt.subplots(figsize=(max(4.0, 0.6 * len(m.heads) + 2.5), max(3.5, 0.28 * len(m.layers) + 1.5)))
    image = ax.imshow(
        m.delta,  # [layers, heads]
        cmap="RdBu",
        vmin=-bound,
        vmax=bound,
        aspect="auto",
        origin="lower",
        extent=(-0.5, len(m.heads) - 0.5, -0.5, len(m.layers) - 0.5),
    )
    fig.colorbar(image, ax=ax, label=colour_label)
    if recognition is not None and m.layers[0] <= recognition <= m.layers[-1]:
        below = sum(1 for layer in m.layers if layer < recognition)  # rows drawn below the line
        ax.axhline(below - 0.5, color="black", ls="--", lw=1, label=f"recognition layer {recognition}")
    rows, columns = {layer: i for i, layer in enumerate(m.layers)}, {h: i for i, h in enumerate(m.heads)}
    for n, (layer, head, _, _) in enumerate(m.top(marked)):
        frame = Rectangle((columns[head] - 0.5, rows[layer] - 0.5), 1, 1, fill=False, edgecolor="black", lw=1.5)
        frame.set_label(f"top {marked} heads" if n == 0 else "_nolegend_")
        ax.add_patch(frame)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7, loc="upper right")
    ax.set_xlabel("query head")
    ax.set_ylabel("layer")
    _label_cells(ax.set_xticks, m.heads, most=32)
    _label_cells(ax.set_yticks, m.layers, most=24)
    ax.set_title(f"{m.key['task']} {m.key['pair']}\n{m.label()}", fontsize=8)
    fig.tight_layout()
    return fig


def _label_cells(set_ticks, values: list[int], most: int) -> None:
    """Tick each cell with the integer it holds; every n-th cell where more than ``most`` would crowd."""
    step = max(1, -(-len(values) // most))
    set_ticks(range(0, len(values), step), [str(v) for v in values[::step]])


# --------------------------------------------------------------------------- depth atlas


def atlas_figures(atlases: list[Atlas], out_dir: Path) -> list[tuple[str, Path]]:
    """Every atlas figure (``atlas_figure``) written as a PNG in ``out_dir``: (title, path) each."""
    import matplotlib.pyplot as plt  # lazy: plotting is only needed for the report

    figures = []
    for a in atlases:
        fig = atlas_figure(a)
        path = out_dir / f"atlas_{_atlas_name(a)}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        figures.append((a.title(), path))
    return figures


def aie_figures(atlases: list[Atlas], out_dir: Path) -> list[tuple[str, Path]]:
    """The function-vector heads' heatmap (``aie_figure``) of every atlas that has one, as PNGs in ``out_dir``."""
    import matplotlib.pyplot as plt  # lazy: plotting is only needed for the report

    figures = []
    for a in atlases:
        if a.aie is not None:
            fig = aie_figure(a)
            path = out_dir / f"aie_{_atlas_name(a)}.png"
            fig.savefig(path, dpi=110)
            plt.close(fig)
            figures.append((f"{a.title()}: function-vector heads", path))
    return figures


def _atlas_name(a: Atlas) -> str:
    """A file name stem unique to the atlas's cell (the test set size and data digest only where set)."""
    k = a.key
    extra = "".join(f"_{f}{k[f]}" for f in ("n_test", "data") if k[f] not in (None, ""))
    return f"{k['task']}_{k['pair'] or 'all'}_k{k['k']}{'' if k['instructions'] else '_noinstr'}{extra}".replace(
        "/", "-"
    )


def aie_figure(a: Atlas):
    """The average indirect effect of every (layer, head) of ``a``'s function-vector units, drawn as the head
    sweeps are (``heatmap_figure``); the heads the function vector sums framed, the masking recognition
    layer dashed; a matplotlib Figure."""
    if a.aie is None:
        raise ValueError(f"{a.title()} holds no function-vector heads")
    masking = a.methods.get("masking")
    recognition = None if masking is None else masking.point
    return heatmap_figure(a.aie, "average indirect effect", recognition, marked=a.aie.top_heads)


def atlas_figure(a: Atlas):
    """Every method of one atlas on one layer axis, a matplotlib Figure: each method's score divided by its own
    baseline (1 dashed) with its 95% band, the layer it points to marked with its 95% interval as a horizontal
    error bar; the vectors' zero-shot prompt dotted in their colour."""
    import matplotlib.pyplot as plt  # lazy: plotting is only needed for the report
    from matplotlib.ticker import MaxNLocator  # lazy: plotting is only needed for the report

    fig, ax = plt.subplots(figsize=(8.5, 4.8))
    ax.axhline(1.0, color="black", ls="--", lw=1, label="the method's own baseline")
    for name, m in a.methods.items():
        points_to = f"layer {m.point} ({m.what})" if m.point is not None else m.what.split(":")[0]
        style = ":" if name.startswith(FURTHER_LENS) else "-"  # colours repeat past ten methods: styles tell
        (line,) = ax.plot(m.layers, m.normalised, marker="o", ms=3, ls=style, label=f"{name}: {points_to}")
        lo, hi = zip(*m.band)
        ax.fill_between(m.layers, lo, hi, color=line.get_color(), alpha=0.15)
        for what, level in m.references.items():
            ax.axhline(level, color=line.get_color(), ls=":", lw=1, label=f"{name}: {what}")
        if m.point is not None and m.point in m.layers:
            y = m.normalised[m.layers.index(m.point)]
            start, end = m.interval or (m.point, m.point)
            error = [[max(0.0, m.point - start)], [max(0.0, end - m.point)]]
            ax.errorbar([m.point], [y], xerr=error, fmt="D", ms=6, capsize=4, color=line.get_color())
    ax.set_xlabel("layer")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("score / the method's own baseline")
    ax.set_title(a.title(), fontsize=10)
    # below the axes: inside, it hides the curves (they span every layer)
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig
