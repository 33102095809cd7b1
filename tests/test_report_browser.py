"""The report's interactive Explore section (``results/explore.py``, ``interactive.py``, ``report.js``): the page's
data against the store, without a browser; then the page itself in headless Chromium (Playwright): it loads
offline with no console error, a hover shows a point's score and interval, a click on a layer or a head-map cell
shows that row's stored generations beside the unmasked ones, the filters hide the rest, and a screenshot has the
page's structure.

One small store (``tiny:llama``, fra-eng, k=1, two test items) is built once for the module: a layer sweep of two
conditions (one of them with two seeds) and a head knockout. A random model says the same nonsense everywhere, so
a few rows are rewritten as if the model had answered the reference (scored with the task's own metric): the
curves then climb, and some rows differ from the unmasked one. One generation holds ``</script>``.
"""

from __future__ import annotations

import json
import re
import sqlite3
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import REPO, tiny
from icl_locate import api
from icl_locate.results.explore import N_ITEMS
from icl_locate.results.interactive import inline_script, script_json
from icl_locate.results.report import build_report
from icl_locate.results.store import Store
from icl_locate.tasks.metrics import metric_named

N_BOOT = 20
COMMON = dict(model="tiny:llama", pairs=["fra-eng"], ks=[1], n_test=2, max_new_tokens=4, layers="0,2,4")
FORCED = dict(engine="fast", head="plain", draft_tokens=0, audit=0)  # no engine calibration: a fast fixture
IE = "instructions+examples"
INJECTED = "</script><script>window.injected = 1</script><!-- <script>"
GROUP = "Masking: flores fra-eng k=1"


@dataclass
class Explored:
    store: Path
    report: Path
    page: str
    units: dict  # (kind, condition, seed) -> unit id


def units_of(store: Path) -> dict:
    with Store(store, create=False) as s:
        return {(u["spec"]["kind"], u["spec"]["condition"], u["spec"]["seed"]): u["unit_id"] for u in s.units()}


@dataclass
class _Target:
    target: str  # what a metric reads of a test item


def answer_right(db, unit_id: str, variant: str, layer: int, item: int) -> None:
    """Rewrite one stored row as if the model had answered the reference, scored by the task's metric."""
    (reference,) = db.execute(
        "SELECT reference FROM predictions WHERE unit_id=? AND variant=? AND layer=? AND item=?",
        (unit_id, variant, layer, item),
    ).fetchone()
    bleu = metric_named("bleu").score([reference], [_Target(reference)], None)
    db.execute(
        "UPDATE predictions SET generation=?, raw_generation=?, sentence_score=?, stats=? "
        "WHERE unit_id=? AND variant=? AND layer=? AND item=?",
        (reference, reference, bleu.sentence[0], json.dumps(list(bleu.stats[0])), unit_id, variant, layer, item),
    )


@pytest.fixture(scope="module")
def explored(tmp_path_factory, data_dir) -> Explored:
    out = tmp_path_factory.mktemp("explore")
    store = out / "study.sqlite"
    base = {**COMMON, **FORCED, "data_dir": str(data_dir)}
    api.sweep({**base, "conditions": [IE, "examples"], "seeds": [0]}, store)
    api.sweep({**base, "conditions": [IE], "seeds": [1]}, store)
    api.sweep({**base, "conditions": [IE], "seeds": [0], "heads": "knockout", "layers": "1,2"}, store)
    units = units_of(store)
    db = sqlite3.connect(store)
    for seed in (0, 1):
        for item in (0, 1):
            answer_right(db, units[("mask", IE, seed)], "mask", 4, item)
        answer_right(db, units[("mask", IE, seed)], "mask", 2, seed)  # layer 2: one item right
    for item in (0, 1):
        answer_right(db, units[("knockout", IE, 0)], "mask", 4, item)
    answer_right(db, units[("knockout", IE, 0)], "knockout/h1", 2, 0)
    db.execute(
        "UPDATE predictions SET generation=? WHERE unit_id=? AND variant='mask' AND layer=2 AND item=1",
        (INJECTED, units[("mask", "examples", 0)]),
    )
    db.commit()
    db.close()
    with Store(store, create=False) as s:
        report = build_report(s, out / "report", n_boot=N_BOOT)
    return Explored(store, report, report.read_text(), units)


def page_data(page: str) -> dict:
    (text,) = re.findall(r'<script type="application/json" id="explore-data">(.*?)</script>', page, re.S)
    return json.loads(text)


def stored_rows(store: Path, unit_id: str) -> dict:
    """(variant@layer, item) -> the stored prediction row."""
    with Store(store, create=False) as s:
        return {(f"{p['variant']}@{p['layer']}", p["item"]): p for p in s.predictions(unit_id)}


# --------------------------------------------------------------------------- the page's data, no browser


def test_the_page_data_holds_the_stored_generations_and_references(explored):
    data = page_data(explored.page)
    assert set(data["units"]) == set(explored.units.values())  # every unit is shown somewhere
    for unit_id, unit in data["units"].items():
        rows = stored_rows(explored.store, unit_id)
        assert [i["item"] for i in unit["items"]] == list(range(min(2, N_ITEMS)))
        assert set(unit["rows"]) == {key for key, _ in rows}  # every row of the unit
        for key, shown in unit["rows"].items():
            for i, row in enumerate(shown):
                assert row["generation"] == rows[(key, i)]["generation"]
        for item in unit["items"]:
            assert item["reference"] == rows[("mask@4", item["item"])]["reference"]
    examples = data["units"][explored.units[("mask", "examples", 0)]]
    assert examples["rows"]["mask@2"][1]["generation"] == INJECTED


def test_a_generation_cannot_close_the_script_element(explored):
    page = explored.page
    assert INJECTED not in page and "window.injected" in page  # there, but escaped
    assert page.count("</script>") == page.count("<script")  # every script element ends where it should
    assert "<!--" not in page
    assert script_json({"a": "</script><!--&\u2028"}) == '{"a":"\\u003c/script\\u003e\\u003c!--\\u0026\\u2028"}'
    assert inline_script("x = '</SCRIPT>'") == "<script>x = '<\\/SCRIPT>'</script>"


def test_the_marks_are_the_tokens_the_condition_hides(explored, data_dir):
    data = page_data(explored.page)
    items = api.prompts(tiny("llama"), "flores", pair="fra-eng", condition=IE, k=1, n_test=2, data_dir=data_dir)
    unit = data["units"][explored.units[("mask", IE, 0)]]
    for i, item in enumerate(items):
        text = data["prompts"][unit["items"][i]["prompt"]]
        assert text == item.text
        marked = [text[a:b] for a, b in unit["rows"]["mask@2"][i]["hidden"]]
        assert marked == item.hidden_text and marked[0].startswith("Translate French to English:")
        assert unit["rows"]["mask@4"][i]["hidden"] == []  # masked from L: nothing hidden


def test_curves_per_seed_pool_to_the_report_curve(explored):
    curves = [c for c in page_data(explored.page)["curves"] if c["condition"] == IE]
    pooled, seeds = curves[0], curves[1:]
    assert pooled["seed"] == "all" and pooled["views"] == ["all"] and [c["seed"] for c in seeds] == ["0", "1"]
    study = api.open_store(explored.store).curves(n_boot=N_BOOT)
    expected = study[study.condition == IE]
    assert pooled["score"] == pytest.approx(expected.score.tolist(), abs=1e-4)
    assert pooled["lo"] == pytest.approx(expected.ci_low.tolist(), abs=1e-4)
    mean = [(a + b) / 2 for a, b in zip(seeds[0]["score"], seeds[1]["score"])]
    assert pooled["score"] == pytest.approx(mean, abs=1e-3) and pooled["score"][-1] == pytest.approx(100)
    single = next(c for c in page_data(explored.page)["curves"] if c["condition"] == "examples")
    assert single["views"] == ["all", "0"]  # one seed: shown pooled and under its seed


def report_without_prompts(explored, tmp_path) -> Path:
    """The fixture's store with its prompts table dropped (as written before prompts were kept), reported."""
    old = tmp_path / "old.sqlite"
    old.write_bytes(explored.store.read_bytes())
    db = sqlite3.connect(old)
    db.execute("DROP TABLE prompts")  # as written before prompts were kept
    db.commit()
    db.close()
    with Store(old, create=False) as s:
        page = build_report(s, tmp_path / "rep", n_boot=N_BOOT).read_text()
    shown = page_data(page)
    assert shown["prompts"] == [] and shown["curves"]
    assert all(i["prompt"] is None for u in shown["units"].values() for i in u["items"])
    assert all(r["hidden"] is None for u in shown["units"].values() for rows in u["rows"].values() for r in rows)
    return tmp_path / "rep" / "report.html"


def test_a_store_without_prompts_still_reports(explored, tmp_path):
    report_without_prompts(explored, tmp_path)


def test_prompt_not_stored_reads_as_a_note_in_the_browser(browser, explored, tmp_path):
    """Found in review: "prompt not stored" was a bare paragraph in the page's default 16px, larger than the
    prompts and generations around it (12px), so it read like a heading."""
    report = report_without_prompts(explored, tmp_path)
    page = browser.new_page(viewport=dict(width=1280, height=900))
    try:
        page.goto(report.as_uri())
        page.wait_for_selector("#explore[data-ready=yes]")
        click(page, GROUP, curve_point(page, f"{IE} (instr, k=1)", 2), f"{IE} (instr, k=1)")
        missing = group(page, GROUP).locator(".detail .prompt.missing")
        assert missing.count() == 2 and missing.first.text_content().startswith("prompt not stored")
        size = missing.first.evaluate("e => getComputedStyle(e).fontSize")
        assert size == group(page, GROUP).locator(".detail pre.text").first.evaluate(
            "e => getComputedStyle(e).fontSize"
        )
    finally:
        page.close()


def test_a_cell_swept_again_with_other_layers_is_one_curve(explored, tmp_path, data_dir):
    """Found in review: a cell swept again with other layers (--layers 0,2,4, then 1,3) made a second unit of
    the same seed, stacked as if it were another seed; with no layer in common the report failed (IndexError),
    a head sweep's extra layer failed with KeyError. The rows of one seed are one curve / one map now."""
    store = tmp_path / "again.sqlite"
    store.write_bytes(explored.store.read_bytes())
    base = {**COMMON, **FORCED, "data_dir": str(data_dir), "seeds": [0]}
    api.sweep({**base, "conditions": ["examples"], "layers": "1,3"}, store)
    api.sweep({**base, "conditions": [IE], "heads": "knockout", "layers": "3"}, store)
    with Store(store, create=False) as s:
        page = build_report(s, tmp_path / "rep", n_boot=N_BOOT).read_text()
    data = page_data(page)
    (examples,) = [c for c in data["curves"] if c["condition"] == "examples"]
    assert examples["layers"] == [0, 1, 2, 3, 4] and examples["seeds"] == ["0"] and examples["views"] == ["all", "0"]
    assert set(data["units"][examples["unit"]]["rows"]) == {f"mask@{layer}" for layer in range(5)}
    (knockout,) = [m for m in data["heads"] if m["seed"] == "all"]
    assert knockout["layers"] == [1, 2, 3] and "knockout/h0@3" in data["units"][knockout["unit"]]["rows"]
    with pytest.raises(api.UserError, match="share no swept layers"):  # stored, then its summary says why not
        api.sweep({**base, "conditions": [IE], "seeds": [2], "layers": "1,3"}, store)  # none shared with seeds 0, 1
    with Store(store, create=False) as s, pytest.raises(api.UserError, match="share no swept layers"):
        build_report(s, tmp_path / "rep", n_boot=N_BOOT)


# --------------------------------------------------------------------------- the page in a browser


@dataclass
class Viewer:
    page: object  # playwright's Page
    console: list  # (type, text) of every console message and page error
    requests: list  # every URL the page asked for


@pytest.fixture(scope="module")
def viewer(browser, explored):
    """The report opened once for the module's browser tests (each resets the filters it changes)."""
    context = browser.new_context(viewport=dict(width=1280, height=900))
    page = context.new_page()
    seen = Viewer(page, [], [])
    page.on("console", lambda m: seen.console.append((m.type, m.text)))
    page.on("pageerror", lambda e: seen.console.append(("pageerror", str(e))))
    page.on("request", lambda r: seen.requests.append(r.url))
    page.goto(explored.report.as_uri())
    page.wait_for_selector("#explore[data-ready=yes]")
    yield seen
    context.close()


def set_filters(page, task: str = "all", condition: str = "all", seed: str = "all") -> None:
    for name, value in (("task", task), ("condition", condition), ("seed", seed)):
        page.select_option(f"#filter-{name}", value)


def group(page, title: str):
    return page.locator(f'.explore-group[data-group="{title}"]')


def curve_point(page, name: str, layer: int) -> tuple[float, float]:
    """The centre of the point of curve ``name`` at ``layer`` in the masking chart, scrolled into view."""
    group(page, GROUP).locator(".chart").scroll_into_view_if_needed()
    trace, index = page.evaluate(
        """([title, name, layer]) => {
            const g = [...document.querySelectorAll('.curve-group')].find(e => e.dataset.group === title);
            const data = g.querySelector('.chart').data;
            const t = data.findIndex(d => d.name === name);
            return [t, data[t].x.indexOf(layer)];
        }""",
        [GROUP, name, layer],
    )
    assert trace >= 0 and index >= 0, f"no point for {name} at layer {layer}"
    box = group(page, GROUP).locator(".scatterlayer .trace").nth(trace).locator(".points path").nth(index)
    b = box.bounding_box()
    return b["x"] + b["width"] / 2, b["y"] + b["height"] / 2


def head_cell(page, title: str, layer_row: int, head_column: int, n_layers: int, n_heads: int) -> tuple[float, float]:
    """The centre of a heat-map cell, scrolled into view: rows and columns are categories spread evenly over the
    plot area."""
    group(page, title).locator(".chart").scroll_into_view_if_needed()
    b = group(page, title).locator(".nsewdrag").first.bounding_box()
    x = b["x"] + (head_column + 0.5) * b["width"] / n_heads
    y = b["y"] + b["height"] - (layer_row + 0.5) * b["height"] / n_layers
    return x, y


def hover(page, title: str, at: tuple[float, float], expect: str) -> str:
    """Move the mouse to ``at`` and wait for the hover label of chart ``title`` to say ``expect``: plotly
    throttles hovering, and a click reports the point hovered last."""
    page.mouse.move(*at)
    label = group(page, title).locator(".hoverlayer .hovertext", has_text=expect)
    label.first.wait_for()
    return label.first.text_content()


def click(page, title: str, at: tuple[float, float], expect: str) -> None:
    """Click at ``at`` once the hover label of chart ``title`` says ``expect`` (``hover``)."""
    hover(page, title, at, expect)
    page.mouse.click(*at)


def shown_items(panel) -> list[dict]:
    """What the open panel shows per item: this row's and the unmasked generation, the badge, the reference,
    the marked prompt text."""
    return panel.evaluate(
        """p => [...p.querySelectorAll('.item')].map(box => ({
            at: box.querySelector('.at-row pre.text').textContent,
            base: box.querySelector('.baseline pre.text').textContent,
            badge: box.querySelector('.at-row .badge').textContent,
            reference: box.querySelector('.reference pre.text').textContent,
            marked: [...box.querySelectorAll('mark.hidden')].map(m => m.textContent),
        }))"""
    )


def test_the_page_loads_offline_with_no_console_error(viewer, explored):
    assert [m for m in viewer.console if m[0] in ("error", "pageerror", "warning")] == []
    assert {u for u in viewer.requests if not u.startswith("data:")} == {explored.report.as_uri()}
    assert viewer.page.evaluate("window.injected") is None  # the generation holding </script> ran nothing
    assert viewer.page.evaluate("typeof Plotly") == "object"


def test_hovering_a_point_shows_its_score_and_interval(viewer, explored):
    page = viewer.page
    set_filters(page)
    curves = api.open_store(explored.store).curves(n_boot=N_BOOT)
    row = curves[(curves.condition == IE) & (curves.layer == 2)].iloc[0]
    assert 0 < row.score < 100 and row.ci_low < row.ci_high  # a point worth reading
    text = hover(page, GROUP, curve_point(page, f"{IE} (instr, k=1)", 2), f"{IE} (instr, k=1)")
    assert "layer 2" in text and f"BLEU {row.score:.2f}" in text
    assert f"95% interval {row.ci_low:.2f} to {row.ci_high:.2f}" in text
    page.mouse.move(0, 0)


def test_clicking_a_layer_shows_that_layers_generations_beside_the_unmasked_ones(viewer, explored):
    page = viewer.page
    set_filters(page)
    stored = stored_rows(explored.store, explored.units[("mask", IE, 0)])
    click(page, GROUP, curve_point(page, f"{IE} (instr, k=1)", 2), f"{IE} (instr, k=1)")
    panel = group(page, GROUP).locator(".detail")
    panel.wait_for()
    assert "layer 2" in panel.locator(".detail-title").text_content()
    items = shown_items(panel)
    assert len(items) == 2
    for i, item in enumerate(items):
        at, base = stored[("mask@2", i)]["generation"], stored[("mask@4", i)]["generation"]
        assert (item["at"], item["base"], item["reference"]) == (at, base, stored[("mask@4", i)]["reference"])
        assert item["badge"] == ("same as nothing hidden" if at == base else "differs")
        assert item["marked"][0].startswith("Translate French to English:")
    assert [item["badge"] for item in items] == ["same as nothing hidden", "differs"]  # item 0 right at layer 2

    click(page, GROUP, curve_point(page, "examples (instr, k=1)", 2), "examples (instr, k=1)")  # holds </script>
    assert panel.locator(".detail-title").text_content() == "examples (instr, k=1): layer 2"
    items = shown_items(panel)
    assert items[1]["at"] == INJECTED and items[1]["badge"] == "differs"


def test_clicking_a_head_cell_shows_that_knockouts_generations(viewer, explored):
    page = viewer.page
    set_filters(page)
    title = f"Heads: flores fra-eng {IE} head knockout (instr, k=1)"
    stored = stored_rows(explored.store, explored.units[("knockout", IE, 0)])
    click(page, title, head_cell(page, title, layer_row=1, head_column=1, n_layers=2, n_heads=4), "layer 2, head 1")
    panel = group(page, title).locator(".detail")
    panel.wait_for()
    assert panel.locator(".detail-title").text_content().endswith("layer 2, head 1")
    items = shown_items(panel)
    assert [item["at"] for item in items] == [stored[("knockout/h1@2", i)]["generation"] for i in (0, 1)]
    assert [item["base"] for item in items] == [stored[("mask@4", i)]["generation"] for i in (0, 1)]
    assert [item["badge"] for item in items] == ["same as nothing hidden", "differs"]

    text = hover(page, title, head_cell(page, title, layer_row=0, head_column=3, n_layers=2, n_heads=4), "head 3")
    assert "layer 1, head 3" in text and "95% interval" in text
    page.mouse.move(0, 0)


def test_the_filters_hide_the_other_condition_and_seed(viewer):
    page = viewer.page
    heads = page.locator(".head-group")

    def traces() -> list[str]:
        return group(page, GROUP).locator(".chart").evaluate("c => c.data.map(d => d.name)")

    set_filters(page)
    assert traces() == ["examples (instr, k=1)", f"{IE} (instr, k=1)"] and heads.first.is_visible()
    set_filters(page, condition="examples")
    assert traces() == ["examples (instr, k=1)"] and not heads.first.is_visible()
    set_filters(page, condition="examples", seed="1")
    assert not group(page, GROUP).is_visible()  # the examples curve has seed 0 only
    set_filters(page, condition=IE, seed="1")
    assert traces() == [f"{IE} (instr, k=1), seed 1"] and not heads.first.is_visible()
    set_filters(page, task="flores", seed="0")
    assert traces() == ["examples (instr, k=1)", f"{IE} (instr, k=1), seed 0"] and heads.first.is_visible()
    assert page.locator("#filter-task option").all_text_contents() == ["all tasks", "flores"]
    set_filters(page)


def test_a_screenshot_has_the_pages_structure(viewer, tmp_path):
    page = viewer.page
    set_filters(page)
    click(page, GROUP, curve_point(page, f"{IE} (instr, k=1)", 0), "layer 0")
    shot = tmp_path / "report.png"
    page.screenshot(path=str(shot), full_page=True)
    width, height = page.evaluate("[document.documentElement.scrollWidth, document.documentElement.scrollHeight]")
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    parts = {
        "heading": "h1",
        "summary": "table",
        "filters": "#explore-filters",
        "curve chart": f'.explore-group[data-group="{GROUP}"] .main-svg',
        "curve points": ".curve-group .points path",
        "heat map": ".head-group .heatmaplayer",
        "colour bar": ".head-group .colorbar",
        "open panel": ".curve-group .detail .item",
        "marked prompt": ".curve-group .detail mark.hidden",
        "static figure": 'img[src^="data:image/png"]',
    }
    for what, selector in parts.items():
        box = page.locator(selector).first.bounding_box()
        assert box is not None and box["width"] > 0 and box["height"] > 0, f"{what} ({selector}) not drawn"
        assert box["x"] + box["width"] <= width + 1 and box["y"] + page.evaluate("scrollY") >= 0, what
    assert height > 900


def test_a_layer_ablation_of_a_task_without_pairs_reads_as_such(browser, tmp_path):
    """Found in review: a task without pairs was titled "Masking: capitals  k=1" (two spaces), and a click on a
    layer-ablation point called its reference row "nothing hidden" and promised marked tokens."""
    settings = dict(COMMON, **FORCED, task=str(REPO / "examples" / "capitals" / "capitals.yaml"), pairs=None)
    api.sweep(
        {**settings, "n_test": 1, "conditions": [IE], "layer_ablation": True, "layers": "0,4"}, tmp_path / "s.sqlite"
    )
    report = api.report(tmp_path / "s.sqlite", tmp_path / "report", bootstrap=N_BOOT)
    groups = [c["group"] for c in page_data(report.read_text())["curves"]]
    assert groups == ["Layer ablation: capitals k=1", "Masking: capitals k=1"]
    page = browser.new_page(viewport=dict(width=1280, height=900))
    try:
        page.goto(report.as_uri())
        page.wait_for_selector("#explore[data-ready=yes]")
        title = groups[0]
        group(page, title).locator(".chart").scroll_into_view_if_needed()
        point = group(page, title).locator(".scatterlayer .trace .points path").first.bounding_box()
        assert point is not None
        click(page, title, (point["x"] + point["width"] / 2, point["y"] + point["height"] / 2), "layer 0")
        panel = group(page, title).locator(".detail")
        panel.wait_for()
        assert "layer 0's attention removed" in panel.locator(".note").first.text_content()
        assert "Marked" not in panel.locator(".note").first.text_content()
        assert (
            panel.locator(".baseline .generation-title")
            .first.text_content()
            .startswith("no attention removed (layer 4)")
        )
        assert panel.locator("mark.hidden").count() == 0
    finally:
        page.close()
