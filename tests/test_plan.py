"""``icl-locate plan`` against the real sweep of the same settings, the cost model's pieces against each
other, and the shipped alias sizes against the published parameter counts."""

from __future__ import annotations

import json
import sqlite3

import numpy as np
import pytest

from icl_locate.cli import main
from icl_locate.core.catalog import ALIASES, EMBEDDED
from icl_locate.core.costs import ModelDims, request_flops, segment_flops, shape_of_config
from icl_locate.core.shapes import ALIAS_SHAPES, ModelShape

# the published sizes (model cards, checkpoint metadata): the alias table must agree within 3%
PUBLISHED = {
    EMBEDDED: 268e6,
    "gpt-neo-2.7b": 2.7e9,
    "bloom-3b": 3.0e9,
    "starcoder2-7b": 7.17e9,
    "llama-3.1-8b": 8.03e9,
    "llama-3.1-8b-instruct": 8.03e9,
}


def test_alias_shapes_match_published_sizes():
    assert set(ALIAS_SHAPES) == {EMBEDDED, *ALIASES}
    for alias, shape in ALIAS_SHAPES.items():
        assert abs(shape.params / PUBLISHED[alias] - 1) < 0.03, alias
        # the numbers themselves imply the count (a wrong width or layer count shows here)
        assert abs(shape.computed_params() / shape.params - 1) < 0.03, alias


def test_shape_of_a_config_matches_the_model():
    from conftest import tiny

    loaded = tiny("llama")
    shape = shape_of_config(loaded.model.config)
    assert (shape.layers, shape.heads, shape.kv_heads, shape.head_dim) == (4, 4, 2, 8)
    exact, from_shape = ModelDims.of(loaded.model), ModelDims.of_shape(shape)
    for counted, analytic in zip(exact.layer_params, from_shape.layer_params):
        assert 0 <= counted - analytic <= 2 * shape.hidden  # norms are all the shape leaves out
    assert (exact.attention_width, exact.lm_head, exact.windows) == (
        from_shape.attention_width,
        from_shape.lm_head,
        from_shape.windows,
    )


def test_segment_flops_equal_request_flops():
    """A prefill then a decoding by blocks gives request_flops' per-token count, sliding windows included."""
    shape = ModelShape(
        layers=6, hidden=64, heads=4, kv_heads=1, head_dim=16, intermediate=128, vocab=500, context=None,
        params=0, tied=True, windows=(8, 8, None),
    )  # fmt: skip
    dims = ModelDims.of_shape(shape)
    for length, fed in [(5, 0), (5, 7), (20, 3), (1, 12)]:
        want = request_flops(dims, length, (0, 0), fed, from_layer=shape.layers)
        prompt = float(segment_flops(dims, 0, length)) + 2 * dims.lm_head
        decode = float(segment_flops(dims, length, fed)) + 2 * dims.lm_head * fed
        assert prompt == pytest.approx(want["prompt"]) and decode == pytest.approx(want["decode"])
    copies = [3, 1, 2, 5, 1, 1]  # per-layer rows scale their own layer only
    by_layer = sum(
        c * float(segment_flops(dims, 4, 6, [float(i == n) for i in range(6)])) for n, c in enumerate(copies)
    )
    assert float(segment_flops(dims, 4, 6, copies)) == pytest.approx(by_layer)
    assert np.allclose(
        segment_flops(dims, np.array([0, 3]), np.array([4, 4])), [segment_flops(dims, c, 4) for c in (0, 3)]
    )


@pytest.mark.parametrize(
    "grid, units, rows",
    [
        (dict(conditions=["instructions+examples"], layers="0,2,4"), 1, 2 * 3),
        # one head at a time at layer 1 (+ the baseline), and the instructions condition: own context caches
        (dict(conditions=["instructions"], layers="1", heads="knockout"), 1, 2 * (4 + 1)),
        (dict(conditions=["examples"], layers="0,4", layer_ablation=True), 2, 2 * 2 + 2 * 5),
    ],
)
def test_plan_equals_the_sweep(grid, units, rows, data_dir, tmp_path, monkeypatch):
    """Rows and prompt tokens exact, generated tokens within the bound, and the fast engine's KV cache
    (its batch buffers + the shared context's cache, as allocated) within 25% of the plan's."""
    from icl_locate import api
    from icl_locate.engines import fast

    config = dict(
        model="tiny:llama", pairs=["fra-eng"], ks=[1], n_test=2, max_new_tokens=4, data_dir=str(data_dir),
        engine="fast", audit=0, **grid,
    )  # fmt: skip
    plan = api.plan(config, tflops=1.0)

    measured = {"batch": 0, "prefix": 0, "generated": 0}
    decode_batch, prefix_cache = fast.decode_batch, fast.FastEngine._prefix_cache

    def counting_decode(model, tokenizer, eos, cache, *args, **kwargs):
        kv = sum(layer.buf_k.nbytes + layer.buf_v.nbytes for layer in cache.layers)
        measured["batch"] = max(measured["batch"], kv)
        generations = decode_batch(model, tokenizer, eos, cache, *args, **kwargs)
        measured["generated"] += sum(len(g.token_ids) for g in generations)
        return generations

    def counting_prefix(self, row):
        kv = prefix_cache(self, row)
        measured["prefix"] = max(measured["prefix"], sum(k.nbytes + v.nbytes for k, v in kv))
        return kv

    monkeypatch.setattr(fast, "decode_batch", counting_decode)
    monkeypatch.setattr(fast.FastEngine, "_prefix_cache", counting_prefix)
    monkeypatch.setenv("ICL_LOCATE_CACHE", str(tmp_path / "cache"))
    api.sweep(config, tmp_path / "study.sqlite")

    with sqlite3.connect(tmp_path / "study.sqlite") as db:
        stored = db.execute("SELECT prompt_token_ids FROM predictions").fetchall()
        assert len(plan.units) == db.execute("SELECT COUNT(*) FROM units").fetchone()[0] == units
    assert plan.total("rows") == len(stored) == rows
    assert plan.total("prompt_tokens") == sum(len(json.loads(ids)) for (ids,) in stored)
    assert 0 < measured["generated"] <= plan.total("generated_bound") == rows * 4
    assert plan.tokens_counted
    assert measured["batch"] and abs(plan.peak("kv_bytes") / (measured["batch"] + measured["prefix"]) - 1) <= 0.25
    flops = [plan.flops(engine) for engine in ("paper", "fast", "tree")]
    assert flops[0] > flops[1] >= flops[2] > 0  # sharing the context, then the states below the mask layers
    assert plan.flops("fast") <= plan.flops("fast", bound=True)


@pytest.mark.parametrize("method", ["task-vector", "function-vector", "logit-lens"])
def test_plan_of_a_method_unit_equals_its_sweep(method, data_dir, tmp_path, monkeypatch):
    """Method units: rows and their prompt tokens exact, generated tokens within the bound, FLOPs above the
    forward they cannot do without."""
    from icl_locate import api

    config = dict(
        model="tiny:llama", pairs=["fra-eng"], ks=[2], n_test=3, max_new_tokens=4, data_dir=str(data_dir),
        layers="0,1,3", method=method, audit=0, **({"top_heads": 2} if method == "function-vector" else {}),
    )  # fmt: skip
    plan = api.plan(config, tflops=1.0)
    monkeypatch.setenv("ICL_LOCATE_CACHE", str(tmp_path / "cache"))
    api.sweep(config, tmp_path / "study.sqlite")
    with sqlite3.connect(tmp_path / "study.sqlite") as db:
        stored = db.execute("SELECT prompt_token_ids, raw_generation FROM predictions").fetchall()
    assert len(plan.units) == 1 and plan.total("rows") == len(stored) > 0
    assert plan.total("prompt_tokens") == sum(len(json.loads(ids)) for ids, _ in stored)
    assert plan.total("generated_bound") == (0 if method == "logit-lens" else 3 * (3 + 2) * 4)
    assert plan.flops("tree") <= plan.flops("fast") <= plan.flops("paper")


def test_plan_of_an_alias_offline(data_dir, tmp_path, monkeypatch, capsys):
    """llama-3.1-8b with paper-mt on 8 Ray workers: planned from the shipped numbers (no hub, no
    tokenizer: tokens estimated, and said so), printed and written."""
    from icl_locate.experiments import plan

    monkeypatch.setattr(plan, "try_to_load_from_cache", lambda repo, name: None)  # as on a machine without it
    out = tmp_path / "plan.json"
    argv = ["plan", "--model", "llama-3.1-8b", "--preset", "paper-mt", "--n-test", "16", "--data-dir", str(data_dir)]
    assert main([*argv, "--executor", "ray", "--workers", "8", "--tflops", "400", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    for needed in ("120 units", "rows", "prompt tokens", "ESTIMATED", "upper bound", "KV cache", "TFLOP", "8 worker"):
        assert needed in text, needed
    data = json.loads(out.read_text())
    assert data["totals"]["rows"] == 120 * 16 * 33  # units x items x layers 0..32
    assert not data["tokens_counted"] and data["shape"]["params"] == ALIAS_SHAPES["llama-3.1-8b"].params
    seconds = data["totals"]["seconds_workers"]["tree"], data["totals"]["seconds_local"]["tree"]
    assert seconds[1] / 8 <= seconds[0] < seconds[1]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["plan", "--tflops", "0"], "--tflops must be > 0"),
        (["plan", "--method", "task-vector", "--n-test", "1"], "--n-test >= 2"),
        (["plan", "--executor", "ray", "--workers", "0"], "--workers must be >= 1"),
        (["plan", "--n-test", "0"], "--n-test must be >= 1"),
    ],
)
def test_plan_bad_input_is_one_line(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err


def test_plan_help_and_settings_need_no_torch():
    from test_startup import without_model_stack

    assert "--tflops" in without_model_stack("plan", "--help").stdout
    done = without_model_stack("plan", "--tflops", "-1")
    assert done.returncode == 2 and "--tflops must be > 0" in done.stderr and "Traceback" not in done.stderr


def test_matmul_rate_is_measured_once(tmp_path):
    from icl_locate.engines.matmul_rate import matmul_tflops

    first, what = matmul_tflops(8, 32, 64, "float32", "cpu", seconds=0.01, cache=tmp_path)
    again, cached = matmul_tflops(8, 32, 64, "float32", "cpu", seconds=0.01, cache=tmp_path)
    assert first > 0 and again == first and "cached" in cached and "cached" not in what


@pytest.mark.parametrize(
    "kept", ["{not json", '{"key": {}}', '{"tflops": "fast"}', '{"tflops": -1}', '{"tflops": Infinity}', "[1]"]
)
def test_a_matmul_rate_that_cannot_be_read_is_measured_again(kept, tmp_path):
    """A torn or foreign cache entry costs a measurement, never a traceback or a wrong rate."""
    from icl_locate.engines.matmul_rate import matmul_tflops

    matmul_tflops(8, 32, 64, "float32", "cpu", seconds=0.01, cache=tmp_path)
    [entry] = tmp_path.glob("matmul-*.json")
    entry.write_text(kept)
    rate, what = matmul_tflops(8, 32, 64, "float32", "cpu", seconds=0.01, cache=tmp_path)
    assert rate > 0 and "measured" in what
    assert matmul_tflops(8, 32, 64, "float32", "cpu", seconds=0.01, cache=tmp_path) == (rate, "cached")


@pytest.mark.parametrize(
    "grid, rule",
    [
        (dict(conditions=["instructions+examples"], layers="0,1,2,3,4"), 8),  # 3.5 states a query: 2 queries
        (dict(conditions=["instructions+examples"], layers="0,1,2,3,4"), 4),  # 1 query a batch
        (dict(conditions=["instructions"], layers="0,1,2,3,4"), 8),  # a context cache a row: batched by rows
        (dict(conditions=["examples"], layers="2,4", layer_ablation=True), 6),  # ablation groups batch apart
        (dict(conditions=["instructions+examples"], layers="0,1,2,3,4", batch_size=8), 8),  # rows, whole queries
    ],
)
def test_plan_gives_the_tree_engines_largest_batch(grid, rule, data_dir, tmp_path, monkeypatch):
    """The plan's largest tree batch is the largest the engine decodes, with the rule pinned on both sides."""
    from icl_locate import api
    from icl_locate.engines import fast, tree

    config = dict(
        model="tiny:llama", pairs=["fra-eng"], ks=[1], n_test=4, max_new_tokens=4, data_dir=str(data_dir),
        engine="tree", audit=0, **grid,
    )  # fmt: skip
    monkeypatch.setattr(fast, "MAX_BATCH_ROWS", rule)  # the rule the plan reads (fast.rows_by_size)
    plan = api.plan(config, tflops=1.0)

    batches: list[int] = []
    real = tree.TreeDecode
    monkeypatch.setattr(
        tree, "TreeDecode", lambda engine, chunk, *args: batches.append(len(chunk)) or real(engine, chunk, *args)
    )
    monkeypatch.setattr(fast, "rule_rows", lambda *args, **kwargs: rule)
    monkeypatch.setattr(tree, "rows_by_memory", lambda *args, **kwargs: 1000)
    monkeypatch.setenv("ICL_LOCATE_CACHE", str(tmp_path / "cache"))
    api.sweep(config, tmp_path / "study.sqlite")

    assert batches and plan.peak("tree_batch_rows") == max(batches)
