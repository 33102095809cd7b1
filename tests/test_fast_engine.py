"""The fast engine equals the reference engine, row for row."""

from __future__ import annotations

import json

import pytest

from conftest import tiny
from icl_locate.cli import main
from icl_locate.core.conditions import MaskedPrompt, get_condition, hidden_ranges
from icl_locate.core.interventions import UNCHANGED, AblateLayers, AttentionAblation, ColumnMask, MaskFrom
from icl_locate.core.prompts import FORMATS, EncodedPrompt, Example, build_prompt, encode_prompt
from icl_locate.engines import fast
from icl_locate.engines.base import StopRule
from icl_locate.engines.decoding import decode_batch
from icl_locate.engines.fast import FastEngine
from icl_locate.engines.reference import ReferenceEngine, greedy_decode
from icl_locate.experiments import bench

FAMILIES = ["llama", "gemma3", "qwen2", "starcoder2", "gpt_neo", "bloom", "gpt2", "mistral", "gpt_neox"]
BANK = [Example(str(i), f"phrase numero {i} ici", f"phrase number {i} here") for i in range(6)]
QUERIES = ["une question", "une autre question un peu plus longue", "court"]


def encoded_prompts(tokenizer, shared: bool = True):
    fmt = FORMATS["instr_machine_translation"]
    out = []
    for i, q in enumerate(QUERIES):
        shots = BANK[:3] if shared else BANK[i : i + 2 + i % 2]
        out.append(encode_prompt(tokenizer, build_prompt(fmt, shots, q, header="Translate French to English:")))
    return out


def reference(lm, enc, condition, row, stop=(), max_new=6):
    """The paper's semantics written out: the condition's columns hidden in every layer >= j, one prompt at a time."""
    n = lm.info.num_layers
    interventions = []
    if isinstance(row, MaskFrom) and condition is not None and row.layer < n:
        ranges = hidden_ranges(condition, enc.spans, len(enc.ids))
        if ranges:
            interventions.append(ColumnMask.at_layers([ranges], range(row.layer, n)))
    if isinstance(row, AblateLayers) and row.layers:
        interventions.append(AttentionAblation(row.layers))
    return greedy_decode(lm.model, lm.tokenizer, enc.ids, interventions, StopRule(tuple(stop), max_new))


def masked(encs, condition):
    return [MaskedPrompt.of(e, condition) for e in encs]


def assert_same(lm, encs, condition, variants, stop=(), max_new=6, batch_size=None):
    engine = FastEngine(lm.model, lm.tokenizer, batch_size=batch_size)
    fast = engine.generate(masked(encs, condition), variants, StopRule(tuple(stop), max_new))
    assert len(fast) == len(encs) * len(variants)
    for i, enc in enumerate(encs):
        for v in variants:
            ref = reference(lm, enc, condition, v, stop, max_new)
            got = fast[(i, v)]
            assert (got.token_ids, got.finish) == (ref.token_ids, ref.finish), (i, v)
    return engine


@pytest.mark.parametrize("family", FAMILIES)
def test_shared_prefix_all_layers(family):
    lm = tiny(family)
    variants = [MaskFrom(j) for j in range(lm.info.num_layers + 1)]
    engine = assert_same(lm, encoded_prompts(lm.tokenizer), get_condition("instructions+examples"), variants)
    assert engine.stats["prefix_forwards"] == 1  # one shared context cache for every layer


@pytest.mark.parametrize("family", ["llama", "gpt_neo", "bloom"])
@pytest.mark.parametrize(
    "condition", ["query", "instructions+examples+query", "instructions", "examples", "all-but-last", "baseline"]
)
def test_conditions_including_query(family, condition):
    lm = tiny(family)
    assert_same(
        lm, encoded_prompts(lm.tokenizer), get_condition(condition), [MaskFrom(j) for j in (0, 2, lm.info.num_layers)]
    )


@pytest.mark.parametrize("family", ["llama", "gemma3", "gpt_neo"])
def test_per_query_prompts_and_small_batches(family):
    lm = tiny(family)
    assert_same(
        lm,
        encoded_prompts(lm.tokenizer, shared=False),
        get_condition("examples"),
        [MaskFrom(j) for j in (0, 1, 3)],
        batch_size=2,
    )


@pytest.mark.parametrize("family", ["llama", "bloom", "gpt2"])
def test_early_stopping(family):
    lm = tiny(family)
    encs = encoded_prompts(lm.tokenizer)
    first = reference(lm, encs[0], None, MaskFrom(lm.info.num_layers), max_new=12)
    stop = (lm.tokenizer.decode(first.token_ids[2:3]),)  # a string the model is known to produce
    assert_same(
        lm, encs, get_condition("instructions+examples"), [MaskFrom(j) for j in (0, 2, 4)], stop=stop, max_new=12
    )


@pytest.mark.parametrize("family", ["llama", "gemma3", "bloom", "gpt_neo"])
def test_whole_layer_ablation(family):
    lm = tiny(family)
    assert_same(
        lm,
        encoded_prompts(lm.tokenizer),
        None,
        [AblateLayers(frozenset({layer})) for layer in range(lm.info.num_layers)],
    )


def test_a_measured_batch_scale_changes_batches_not_results(monkeypatch):
    """A scale set by the calibration (``batch_scale``) changes the rule's batches, not the generations; the
    KV-memory bound still holds over it."""
    lm = tiny("llama")
    encs = encoded_prompts(lm.tokenizer)
    variants = [MaskFrom(j) for j in (0, 2, 4)]
    prompts, stop = masked(encs, get_condition("instructions+examples")), StopRule((), 6)
    batch_rows: list[int] = []

    def counted(model, tokenizer, eos, cache, step_input, *args, **kwargs):
        batch_rows.append(step_input.shape[0])
        return decode_batch(model, tokenizer, eos, cache, step_input, *args, **kwargs)

    monkeypatch.setattr(fast, "decode_batch", counted)
    expected = {k: v.token_ids for k, v in FastEngine(lm.model, lm.tokenizer).generate(prompts, variants, stop).items()}
    assert batch_rows == [9]  # the rule: every row in one batch
    for engine, rows in (
        (FastEngine(lm.model, lm.tokenizer, max_batch_tokens=10**6, batch_scale=1 / 128), [2, 2, 2, 2, 1]),  # 256/128
        (FastEngine(lm.model, lm.tokenizer, batch_scale=1 / 2048), [1] * 9),  # 256/2048 rows: at least one
        (FastEngine(lm.model, lm.tokenizer, batch_scale=2, kv_memory_fraction=1e-12), [1] * 9),  # memory: not scaled
    ):
        batch_rows.clear()
        got = engine.generate(prompts, variants, stop)
        assert {k: v.token_ids for k, v in got.items()} == expected
        assert batch_rows == rows


def test_memory_bound_shrinks_batches_not_results():
    """A KV budget too small for two rows gives one-row batches, with the same generations."""
    lm = tiny("llama")
    encs = encoded_prompts(lm.tokenizer)
    variants = [MaskFrom(j) for j in (0, 2, 4)]
    condition = get_condition("instructions+examples")
    big = FastEngine(lm.model, lm.tokenizer).generate(masked(encs, condition), variants, StopRule((), 6))
    small_engine = FastEngine(lm.model, lm.tokenizer, kv_memory_fraction=1e-12)
    small = small_engine.generate(masked(encs, condition), variants, StopRule((), 6))
    assert {k: v.token_ids for k, v in small.items()} == {k: v.token_ids for k, v in big.items()}
    assert small_engine.stats["steps"] >= len(encs) * len(variants)  # one batch per row
    # one logit row per produced token: no row decoded beside another
    assert small_engine.stats["logit_rows"] == sum(len(g.token_ids) + (g.finish == "eos") for g in small.values())


def test_bench_command_on_tiny_model(tmp_path, capsys, data_dir, monkeypatch):
    out = tmp_path / "bench.json"
    # the peak read before (c) (the model, (a), (b), the calibration), during (c), during (d) and at the end:
    # the process's peak is the largest, though reading a phase's peak resets the kernel's maximum
    peaks = iter([900.0, 300.0, 400.0, 950.0])
    monkeypatch.setattr(bench, "peak_rss_mb", lambda: next(peaks))
    code = main(
        [
            "bench",
            "--model",
            "tiny:llama",
            "--n-test",
            "2",
            "--layers",
            "0,2,4",
            "--k",
            "1",
            "--data-dir",
            str(data_dir),
            "--json",
            str(out),
            "--require-identical",
            "1.0",
        ]
    )
    assert code == 0
    data = json.loads(out.read_text())
    for key in (
        "seconds_paper",
        "seconds_paper_stop",
        "seconds_fast",
        "speedup_vs_paper",
        "speedup_vs_paper_stop",
        "identical_fraction",
        "mismatches",
        "peak_rss_mb",
        "gflops_achieved",
        "gflops_matmul_peak",
    ):
        assert key in data
    assert data["identical_fraction"] == 1.0 and data["pairs"] == 6
    assert (data["peak_rss_mb"], data["peak_rss_mb_fast"], data["peak_rss_mb_spec"]) == (950, 300, 400)
    printed = capsys.readouterr().out
    assert "(c) fast engine" in printed and "peak RSS 950 MB (whole process), 300 MB during (c)" in printed


@pytest.mark.parametrize("family", ["llama", "bloom"])
def test_prompts_without_bos_or_context(family):
    """Zero-shot prompts of BOS-less tokenizers: nothing to share but the first token; query masked."""
    lm = tiny(family)
    encs = []
    for q in QUERIES:
        ids = lm.tokenizer(f"Q:{q}\nA:")["input_ids"][1:]  # drop BOS
        encs.append(
            EncodedPrompt(
                text="", ids=ids, spans={"bos": None, "instructions": None, "examples": None, "query": (0, len(ids))}
            )
        )
    assert_same(lm, encs, get_condition("query"), [MaskFrom(j) for j in (0, 2, 4)])
    assert_same(lm, encs, None, [UNCHANGED])


@pytest.mark.parametrize("family", ["llama", "gpt_neo"])
def test_reference_engine_is_the_written_out_semantics(family):
    """The engine-level oracle (used by run, bench margins and pruning checks) equals the test's own reference."""
    lm = tiny(family)
    encs = encoded_prompts(lm.tokenizer)
    condition = get_condition("instructions+examples")
    rows = [MaskFrom(0), MaskFrom(2), AblateLayers(frozenset({1})), UNCHANGED]
    got = ReferenceEngine(lm.model, lm.tokenizer).generate(masked(encs, condition), rows, StopRule((), 5))
    for i, enc in enumerate(encs):
        for row in rows:
            want = reference(lm, enc, condition if isinstance(row, MaskFrom) else None, row, max_new=5)
            assert got[(i, row)].token_ids == want.token_ids, (i, row)
