"""The depth atlas (``results/atlas.py``) on a store written by hand: every method normalised to its own
baseline and pointing where the rule says, from numbers worked out below; the function-vector heads' mean
effects; the figure, the report's section and the Study's DataFrames."""

from __future__ import annotations

import json
import sqlite3

import numpy as np
import pytest

from icl_locate.cli import main
from icl_locate.core.models import load_model
from icl_locate.experiments import sweep
from icl_locate.experiments.atlas import stored_conditions
from icl_locate.experiments.settings import SweepConfig
from icl_locate.results import analysis
from icl_locate.results.atlas import METHODS, load_atlases
from icl_locate.results.figures import aie_figure, atlas_figure
from icl_locate.results.report import build_report
from icl_locate.results.store import Store
from icl_locate.results.study import Study
from icl_locate.tasks.spec import TaskData
from icl_locate.util.errors import UserError

L = 4  # decoder layers: masking and the lens run 0..L, the vectors 0..L-1
N = 4  # test items
N_BOOT = 50
CELL = dict(task="qa", pair="", instructions=True, seed=0, k=2, n_test=N, data="", labels="gold")

# items answered right (exact match: 1 per item) per layer, the first ones of the N
MASK_RIGHT = [0, 1, 4, 4, 4]  # 0, 25, 100, 100, 100%: recognised from layer 2 (>= 95% of 100 from there on)
TV_RIGHT, TV_ZERO_SHOT, TV_ICL = [1, 3, 2, 0], 1, 4  # best layer 1; / 100% (ICL)
FV_RIGHT, FV_ZERO_SHOT, FV_ICL = [0, 1, 4, 3], 0, 4  # best layer 2
LENS_TOP1 = {"lens/visible": [0, 0, 1, 4, 4], "lens/hidden": [0, 1, 2, 2, 2]}  # top-1 from 3; hidden from 2
HEADS = 2
TOP_HEADS = 2


def effect(layer: int, head: int, item: int) -> float:
    """The synthetic indirect effect of head (layer, head) on one prompt: its mean is layer/10 + head/100 + 0.0015."""
    return layer / 10 + head / 100 + item / 1000


def prediction(variant: str, layer: int, item: int, stats: list[float]) -> dict:
    return dict(
        item=item,
        example_id=f"q{item}",
        variant=variant,
        layer=layer,
        prompt_token_ids=None,
        hidden_ranges=None,
        in_context_ids=None,
        raw_generation="",
        generation="",
        reference="",
        finish="stop",
        sentence_score=stats[0],
        stats=json.dumps(stats),
        n_instructions=1,
        n_examples=2,
        n_query=1,
    )


def exact_match_rows(variant: str, layer: int, right: int) -> tuple[list[dict], tuple]:
    """N items, the first ``right`` answered right, and the row's stored score."""
    rows = [prediction(variant, layer, i, [float(i < right)]) for i in range(N)]
    return rows, (variant, layer, "exact_match", 100.0 * right / N)


def commit(store: Store, run_id: int, unit_id: str, spec: dict, rows: list, heads: tuple = ((), ())) -> None:
    """One unit: ``rows`` ((predictions, score) per row), then the per-head predictions and scores of ``heads``
    (function vectors: after the task metric's, so the task's metric stays the unit's primary one)."""
    predictions = [p for preds, _ in rows for p in preds] + list(heads[0])
    scores = [s for _, s in rows] + list(heads[1])
    assert store.commit_unit(unit_id, run_id, {**CELL, **spec}, 1.0, predictions, scores, 10.0, 2.0)


def indirect_effect_rows() -> tuple[list[dict], list[tuple]]:
    """Every head's "aie/h*" predictions (one per prompt, stats [ie]) and its mean in the scores table."""
    predictions, scores = [], []
    for layer in range(L):
        for h in range(HEADS):
            effects = [effect(layer, h, i) for i in range(N)]
            predictions += [prediction(f"aie/h{h}", layer, i, [ie]) for i, ie in enumerate(effects)]
            scores.append((f"aie/h{h}", layer, "aie", float(np.mean(effects))))
    return predictions, scores


@pytest.fixture
def atlas_store(tmp_path):
    path = tmp_path / "atlas.sqlite"
    with Store(path, {"model": "synthetic"}) as store:
        run = store.start_run("test", {}, {"model": {"spec": "synthetic", "num_layers": L}})
        layers = list(range(L + 1))
        mask = [exact_match_rows("mask", j, right) for j, right in enumerate(MASK_RIGHT)]
        commit(store, run, "mask", dict(kind="mask", condition="instructions+examples", layers=layers), mask)
        for kind, right, zero_shot, icl in (
            ("task-vector", TV_RIGHT, TV_ZERO_SHOT, TV_ICL),
            ("function-vector", FV_RIGHT, FV_ZERO_SHOT, FV_ICL),
        ):
            rows = [exact_match_rows(kind, layer, r) for layer, r in enumerate(right)]
            rows += [exact_match_rows("zero-shot", L, zero_shot), exact_match_rows("icl", L, icl)]
            if kind == "function-vector":
                spec = dict(kind=kind, condition="", layers=layers, top_heads=TOP_HEADS)
                commit(store, run, kind, spec, rows, indirect_effect_rows())
            else:
                commit(store, run, kind, dict(kind=kind, condition="", layers=layers), rows)
        spec = dict(kind="logit-lens", condition="instructions+examples", layers=layers)
        commit(store, run, "lens", spec, lens_rows(LENS_TOP1))
    return path


def the_atlas(path):
    with Store(path, create=False) as store:
        (atlas,) = load_atlases(store, n_boot=N_BOOT)
    return atlas


def contains(interval, layer) -> bool:
    return interval is not None and interval[0] <= layer <= interval[1]


def test_each_method_is_normalised_to_its_own_baseline_and_points_where_its_rule_says(atlas_store):
    atlas = the_atlas(atlas_store)
    assert atlas.key == dict(task="qa", pair="", instructions=True, k=2, n_test=N, data="")
    assert atlas.num_layers == L and list(atlas.methods) == list(METHODS)
    assert atlas.title() == "qa: depth atlas (k=2, instr)"

    tv, fv = atlas.methods["task-vector"], atlas.methods["function-vector"]
    assert tv.layers == list(range(L)) and tv.score == pytest.approx([25, 75, 50, 0])
    assert tv.baseline == pytest.approx(100) and tv.normalised == pytest.approx([0.25, 0.75, 0.5, 0.0])
    assert tv.references == pytest.approx({"zero-shot prompt": 0.25})
    assert (tv.point, tv.what) == (1, "best layer") and tv.interval is not None and contains(tv.interval, 1)
    assert set(tv.interval) <= set(tv.layers)  # percentiles of best layers: layers
    assert fv.normalised == pytest.approx([0.0, 0.25, 1.0, 0.75]) and fv.references["zero-shot prompt"] == 0.0
    assert fv.point == 2 and contains(fv.interval, 2)
    for m in atlas.methods.values():
        assert all(lo <= n + 1e-9 and n <= hi + 1e-9 for n, (lo, hi) in zip(m.normalised, m.band))
    assert tv.band[3] == (0.0, 0.0)  # no item right at layer 3 in any replicate

    visible, hidden = atlas.methods["logit-lens"], atlas.methods["logit-lens (context hidden)"]
    assert visible.layers == hidden.layers == list(range(L + 1))
    assert visible.score == pytest.approx([0, 0, 25, 100, 100]) and visible.baseline == pytest.approx(100)
    assert visible.normalised == pytest.approx([0, 0, 0.25, 1, 1])
    assert hidden.normalised == pytest.approx([0, 0.25, 0.5, 0.5, 0.5])  # / the visible lens's final rate
    assert (visible.point, hidden.point) == (3, 2)  # from there on >= 95% of the curve's own final rate
    assert visible.what == "first layer where the answer is top-1" and contains(visible.interval, 3)


def lens_rows(top1: dict[str, list[int]]) -> list:
    """The lens unit's rows: per variant and layer, the first ``right`` items' answer top-1 (rank 1)."""
    rows = []
    for variant, per_layer in top1.items():
        for layer, right in enumerate(per_layer):
            stats = [[float(i < right), 0.5, 1.0 if i < right else 3.0] for i in range(N)]  # top1, prob, rank
            rows.append(
                (
                    [prediction(variant, layer, i, s) for i, s in enumerate(stats)],
                    (variant, layer, "top1", 100.0 * right / N),
                )
            )
    return rows


def test_the_lens_shows_every_stored_condition_hidden(atlas_store):
    examples_hidden = {"lens/visible": LENS_TOP1["lens/visible"], "lens/hidden": [0, 0, 0, 1, 3]}
    with Store(atlas_store, create=False) as store:
        run = store.start_run("test", {}, {"model": {"spec": "synthetic", "num_layers": L}})
        spec = dict(kind="logit-lens", condition="examples", layers=list(range(L + 1)))
        commit(store, run, "lens-examples", spec, lens_rows(examples_hidden))
    atlas = the_atlas(atlas_store)
    assert list(atlas.methods) == [*METHODS, "logit-lens (hidden: examples)"]
    first, other = atlas.methods["logit-lens (context hidden)"], atlas.methods["logit-lens (hidden: examples)"]
    assert first.normalised == pytest.approx([0, 0.25, 0.5, 0.5, 0.5])  # instructions+examples: drawn first
    assert other.method == "logit-lens (hidden: examples)" and other.baseline_what.endswith("hidden: examples")
    assert other.normalised == pytest.approx([0, 0, 0, 0.25, 0.75]) and other.point == 4


def test_the_masking_method_is_the_reports_recognition_layer(atlas_store):
    with Store(atlas_store, create=False) as store:
        (curve,) = [analysis.analyse_curve(c, n_boot=N_BOOT) for c in analysis.load_curves(store)]
    masking = the_atlas(atlas_store).methods["masking"]
    assert curve.recognition == 2 and masking.point == curve.recognition
    assert masking.interval == curve.recognition_ci and masking.what == "recognition layer"
    assert masking.score == pytest.approx(curve.score) and masking.normalised == pytest.approx([0, 0.25, 1, 1, 1])
    assert "nothing masked" in masking.baseline_what


def test_function_vector_heads_average_their_indirect_effects(atlas_store):
    m = the_atlas(atlas_store).aie
    assert m is not None and m.layers == list(range(L)) and m.heads == list(range(HEADS)) and m.top_heads == 2
    expected = np.array([[layer / 10 + h / 100 + 0.0015 for h in range(HEADS)] for layer in range(L)])
    assert m.delta == pytest.approx(expected)
    assert np.all(m.ci[..., 0] <= m.delta + 1e-12) and np.all(m.delta <= m.ci[..., 1] + 1e-12)
    assert m.ci[..., 1] - m.ci[..., 0] == pytest.approx(np.full((L, HEADS), m.ci[0, 0, 1] - m.ci[0, 0, 0]))
    assert [(layer, h) for layer, h, _, _ in m.top(2)] == [(3, 1), (3, 0)]


def test_the_figures_draw_every_method_on_integer_layers(atlas_store):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    atlas = the_atlas(atlas_store)
    fig = atlas_figure(atlas)
    ax = fig.axes[0]
    fig.canvas.draw()
    drawn_legend = ax.get_legend()
    assert drawn_legend is not None
    legend = [t.get_text() for t in drawn_legend.get_texts()]
    assert "task-vector: layer 1 (best layer)" in legend and "masking: layer 2 (recognition layer)" in legend
    assert "logit-lens (context hidden): layer 2 (first layer where the answer is top-1)" in legend
    curves = [line for line in ax.get_lines() if any(str(line.get_label()).startswith(f"{m}: layer") for m in METHODS)]
    assert len(curves) == len(METHODS)
    assert all(float(t).is_integer() for t in ax.get_xticks())
    assert ax.get_title() == atlas.title()
    plt.close(fig)

    heads = aie_figure(atlas)
    ax = heads.axes[0]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["0", "1", "2", "3"]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["0", "1"]
    assert heads.axes[1].get_ylabel() == "average indirect effect"
    framed = sorted((p.get_x() + 0.5, p.get_y() + 0.5) for p in ax.patches if isinstance(p, Rectangle) and not p.fill)
    assert framed == [(0, 3), (1, 3)]  # (head, layer row) of the top 2 heads
    plt.close(heads)


def test_the_report_has_a_depth_atlas_section(atlas_store, tmp_path):
    with Store(atlas_store, create=False) as store:
        html = build_report(store, tmp_path / "html", n_boot=20).read_text()
        markdown = build_report(store, tmp_path / "md", fmt="md", n_boot=20).read_text()
    assert "<h2>Depth atlas</h2>" in html and "<th>points to layer</th>" in html
    assert "<td>task-vector</td><td>1</td>" in html and "average indirect effect" in html
    assert html.count("<img ") == 3  # the masking curve, the atlas, the function-vector heads (PNG, embedded)
    assert "## Depth atlas" in markdown and "![qa: depth atlas (k=2, instr)](atlas_qa_all_k2_n_test4.png)" in markdown
    assert "| qa (k=2, instr) | logit-lens | 3 |" in markdown
    assert (tmp_path / "md" / "aie_qa_all_k2_n_test4.png").is_file()


def test_a_store_without_masking_curves_says_so(atlas_store, tmp_path):
    import sqlite3

    from icl_locate.results.report import NO_CURVES

    with sqlite3.connect(atlas_store) as db:  # the methods' units only
        masking = [u for (u,) in db.execute("SELECT unit_id FROM units WHERE json_extract(spec, '$.kind') = 'mask'")]
        db.executemany("DELETE FROM predictions WHERE unit_id = ?", [(u,) for u in masking])
        db.executemany("DELETE FROM units WHERE unit_id = ?", [(u,) for u in masking])
    with Store(atlas_store, create=False) as store:
        html = build_report(store, tmp_path / "html", n_boot=20).read_text()
        markdown = build_report(store, tmp_path / "md", fmt="md", n_boot=20).read_text()
    assert NO_CURVES in html and NO_CURVES in markdown and "## Depth atlas" in markdown


def test_the_study_lays_the_atlas_out_as_tidy_frames(atlas_store):
    import matplotlib.pyplot as plt
    from matplotlib.figure import Figure

    study = Study(atlas_store)
    frame = study.atlas(n_boot=N_BOOT)
    assert list(frame.columns) == ["task", "pair", "instructions", "k", "method", "layer", "score", "normalised"] + [
        "lo",
        "hi",
    ]
    assert len(frame) == (L + 1) * 3 + L * 2
    tv = frame[frame.method == "task-vector"]
    assert tv.layer.tolist() == [0, 1, 2, 3] and tv.normalised.tolist() == pytest.approx([0.25, 0.75, 0.5, 0.0])
    points = study.atlas_points(n_boot=N_BOOT)
    assert list(points.columns) == ["task", "pair", "instructions", "k", "method", "layer", "lo", "hi", "what"]
    assert dict(zip(points.method, points.layer)) == {
        "masking": 2,
        "task-vector": 1,
        "function-vector": 2,
        "logit-lens": 3,
        "logit-lens (context hidden)": 2,
    }
    assert points.layer.dtype == "Int64"
    assert isinstance(study.atlas_figure(task="qa"), Figure)
    with pytest.raises(UserError, match="0 depth atlas cells match"):
        study.atlas_figure(k=5)
    plt.close("all")


def test_the_atlas_command_stores_resumes_and_draws(tmp_path, data_dir, capsys, monkeypatch):
    store, out = tmp_path / "atlas.sqlite", tmp_path / "drawn"
    args = ["atlas", "--model", "tiny:llama", "--n-test", "2", "--ks", "2", "--max-new-tokens", "3"]
    args += ["--data-dir", str(data_dir), "--store", str(store), "--out-dir", str(out)]
    loads = []
    monkeypatch.setattr(sweep, "load_model", lambda *a, **kw: loads.append(a) or load_model(*a, **kw))
    assert main(args) == 0
    assert len(loads) == 1  # the four sweeps share one model
    printed = capsys.readouterr().out
    for method in ("masking", "task-vector", "function-vector", "logit-lens"):
        assert f"{method}:" in printed
    assert sorted(p.name.split("_")[0] for p in out.iterdir()) == ["aie", "atlas"]
    db = sqlite3.connect(store)
    kinds = dict(db.execute("SELECT json_extract(spec, '$.kind'), COUNT(*) FROM units GROUP BY 1").fetchall())
    assert kinds == {"mask": 1, "task-vector": 1, "function-vector": 1, "logit-lens": 1}
    rows = lambda kind, variant: db.execute(  # noqa: E731
        "SELECT p.item, p.layer, p.raw_generation FROM predictions p JOIN units u USING (unit_id) "
        "WHERE json_extract(u.spec, '$.kind') = ? AND p.variant = ? ORDER BY p.item, p.layer",
        (kind, variant),
    ).fetchall()
    n_layers = 4
    assert len(rows("task-vector", "task-vector")) == 2 * n_layers
    assert len(rows("function-vector", "aie/h0")) == 2 * n_layers  # every (prompt, layer) of head 0
    assert len(rows("logit-lens", "lens/hidden")) == 2 * (n_layers + 1)
    # the ICL baseline is the unmasked row of the masking sweep; the zero-shot rows agree across units
    unmasked = [(i, g) for i, layer, g in rows("mask", "mask") if layer == n_layers]
    assert [(i, g) for i, _, g in rows("task-vector", "icl")] == unmasked
    assert rows("task-vector", "zero-shot") == rows("function-vector", "zero-shot")
    db.close()
    assert main(args) == 0
    assert capsys.readouterr().err.count("1 already in the store, 0 to run") == 4


def test_the_atlas_lens_reads_under_every_masking_condition_the_store_holds(tmp_path, data_dir):
    store = tmp_path / "atlas.sqlite"
    common = ["--model", "tiny:llama", "--n-test", "2", "--max-new-tokens", "3", "--data-dir", str(data_dir)]
    common += ["--store", str(store)]
    assert main(["sweep", *common, "--ks", "2", "--conditions", "examples"]) == 0
    other_cell = ["--ks", "3", "--conditions", "instructions+examples,instructions"]
    assert main(["sweep", *common, *other_cell]) == 0  # another cell (k): its conditions are not read
    assert main(["atlas", *common, "--ks", "2", "--out-dir", str(tmp_path / "drawn")]) == 0
    db = sqlite3.connect(store)
    lens = db.execute(
        "SELECT json_extract(spec, '$.condition') FROM units WHERE json_extract(spec, '$.kind') = 'logit-lens'"
    ).fetchall()
    db.close()
    assert sorted(c for (c,) in lens) == ["examples", "instructions+examples"]
    with Store(store, create=False) as opened:
        (atlas,) = load_atlases(opened, n_boot=N_BOOT)
    assert "logit-lens (hidden: examples)" in atlas.methods


def test_the_lens_conditions_are_those_of_the_atlas_cells_only(tmp_path):
    path = tmp_path / "shared.sqlite"
    masks = [
        ("instructions+examples", {}),  # the atlas's own
        ("examples-below", {}),  # the lens hides a condition at every layer: the plain form
        ("examples", {}),
        ("example:3", {}),  # the grid's k of 2 has no third example: left out
        ("example:2", {}),
        ("answers", {"k": 3}),  # the same condition of another cell: only with it
        ("instructions+examples", {"k": 3}),
        ("instructions", {"task": "other"}),
        ("instructions+examples", {"task": "other"}),
        ("inputs", {"data": "older" + "0" * 11}),
        ("instructions+examples", {"data": "older" + "0" * 11}),
        ("answers", {"labels": "random"}),
    ]
    with Store(path, {"model": "synthetic"}) as store:
        run = store.start_run("test", {}, {"model": {"spec": "synthetic", "num_layers": L}})
        for n, (condition, other) in enumerate(masks):
            rows = [exact_match_rows("mask", j, 1) for j in range(L + 1)]
            commit(store, run, f"m{n}", dict(kind="mask", condition=condition, layers=list(range(L + 1))) | other, rows)
    config = SweepConfig(ks=[2], n_test=N)
    tasks = {("qa", ""): (None, TaskData(bank=[], test=[], digest=""))}  # built-in data: "" as stored in CELL
    assert stored_conditions(path, config, tasks) == ["instructions+examples", "examples", "example:2"]
    tasks = {("qa", ""): (None, TaskData(bank=[], test=[], digest="older" + "0" * 11))}  # the older data's cell
    assert stored_conditions(path, config, tasks) == ["instructions+examples", "inputs"]


def test_a_vector_that_never_beats_the_zero_shot_prompt_points_nowhere(tmp_path):
    path = tmp_path / "flat.sqlite"
    with Store(path, {"model": "synthetic"}) as store:
        run = store.start_run("test", {}, {"model": {"spec": "synthetic", "num_layers": L}})
        rows = [exact_match_rows("task-vector", layer, 1) for layer in range(L)]  # = the zero-shot prompt
        rows += [exact_match_rows("zero-shot", L, 1), exact_match_rows("icl", L, 4)]
        commit(store, run, "tv", dict(kind="task-vector", condition="", layers=list(range(L + 1))), rows)
    tv = the_atlas(path).methods["task-vector"]
    assert (tv.point, tv.interval, tv.what) == (None, None, "no layer scores above the zero-shot prompt")
    assert tv.normalised == pytest.approx([0.25] * L)


def test_the_atlas_command_fails_in_one_line_before_running_anything(tmp_path, capsys):
    assert main(["atlas", "--model", "tiny:llama", "--store", str(tmp_path / "missing" / "atlas.sqlite")]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.startswith("icl-locate: error: cannot create store") and len(err.splitlines()) == 1
