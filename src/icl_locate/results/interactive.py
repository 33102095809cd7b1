"""The report's interactive Explore section, as one HTML fragment with everything inline: the filters, the
page's data (``explore.explore_data``) as a JSON script block, plotly.js and the page's own script and style
(``report.js``, ``report.css`` beside this module). Nothing is fetched when the page is viewed.

plotly.js is read from the installed ``plotly`` package's copy (``plotly/package_data/plotly.min.js``), found
without importing plotly's Python side. Text inlined in a ``<script>`` block must not close it early: the
JSON has ``<``, ``>`` and ``&`` escaped (a generation may hold ``</script>``), and any ``</script`` in the
scripts is written ``<\\/script``, which JavaScript reads the same.
"""

from __future__ import annotations

import html
import importlib.util
import json
from importlib import resources
from pathlib import Path

from ..util.errors import UserError

EXPLORE_INTRO = (
    "Hover a point for its score and 95% interval; click a point (a layer) or a heat-map cell (a head) to read "
    "the first test items under it: the prompt with the tokens hidden at that row marked, the reference, and "
    "the generation beside the one with nothing hidden (the same store, the same seed). The filters narrow "
    "every chart; 'all seeds' shows the intervals pooled over seeds (the generations then are the first "
    "seed's)."
)


def plotly_js() -> str:
    """The plotly.js bundle the installed ``plotly`` package ships (not importing plotly's Python API)."""
    spec = importlib.util.find_spec("plotly")
    if spec is None or not spec.submodule_search_locations:
        raise UserError("the interactive report needs the 'plotly' package (pip install plotly)")
    path = Path(next(iter(spec.submodule_search_locations))) / "package_data" / "plotly.min.js"
    if not path.is_file():
        raise UserError(f"the 'plotly' package has no {path.name} at {path.parent}")
    return path.read_text(encoding="utf-8")


def asset(name: str) -> str:
    """One of the page's own files shipped beside this module (``report.js``, ``report.css``)."""
    return resources.files(__package__ or "icl_locate.results").joinpath(name).read_text(encoding="utf-8")


def script_json(data) -> str:
    """``data`` as JSON safe inside a ``<script>`` element: no ``<``, ``>`` or ``&`` left (escaped as
    ``\\u003c`` etc., which JSON.parse reads back), so no text in it can end the element or open a comment."""
    text = json.dumps(data, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    for char, escaped in (("&", "\\u0026"), ("<", "\\u003c"), (">", "\\u003e"), ("\u2028", "\\u2028")):
        text = text.replace(char, escaped)
    return text.replace("\u2029", "\\u2029")


def inline_script(code: str) -> str:
    """A script inlined as is, except that ``</script`` (any case) cannot end its element early."""
    lowered, out, start = code.lower(), [], 0
    while (found := lowered.find("</script", start)) >= 0:
        out += [code[start:found], "<\\/"]
        start = found + 2
    return "<script>" + "".join(out) + code[start:] + "</script>"


def explore_section(data: dict) -> str:
    """The Explore section: a heading, how to use it, the filters (filled by the script), the chart area, the
    data, plotly.js and the page's script; the empty string where there is nothing to explore."""
    if not data["curves"] and not data["heads"]:
        return ""
    filters = "".join(
        f'<label>{html.escape(label)} <select id="filter-{name}" data-filter="{name}"></select></label>'
        for name, label in (("task", "task"), ("condition", "condition"), ("seed", "seed"))
    )
    return (
        f"<style>{asset('report.css')}</style>"
        f'<section id="explore"><h2>Explore</h2><p>{html.escape(EXPLORE_INTRO)}</p>'
        f'<div id="explore-filters">{filters}</div><div id="explore-charts"></div></section>'
        f'<script type="application/json" id="explore-data">{script_json(data)}</script>'
        + inline_script(plotly_js())
        + inline_script(asset("report.js"))
    )
