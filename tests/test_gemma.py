"""The embedded Gemma-3-270M end to end (slow: minutes on 2 CPU cores; run in CI)."""

from __future__ import annotations

import json

import pytest

from icl_locate.cli import main
from icl_locate.core.conditions import MaskedPrompt, get_condition, hidden_ranges
from icl_locate.core.interventions import ColumnMask, MaskFrom
from icl_locate.engines.base import StopRule
from icl_locate.engines.fast import FastEngine
from icl_locate.engines.reference import greedy_decode
from icl_locate.tasks.items import build_items, post_process
from icl_locate.tasks.loaders import load_data
from icl_locate.tasks.metrics import translation_scores
from icl_locate.tasks.registry import get_task
from icl_locate.tasks.spec import TaskOptions

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def mt_items(gemma, data_dir):
    task = get_task("flores")
    data = load_data(task, TaskOptions(data_dir=str(data_dir), pair="fra-eng"))
    return task, build_items(task, data, gemma.tokenizer, k=5, seed=0, n_test=8)


@pytest.fixture(scope="module")
def masked_answers(gemma, mt_items):
    """Post-processed answers of the 8 items masked from layer 0 and from layer L (= nowhere = the baseline).

    By the fast engine, in one call: the test below checks it against the reference engine on this model.
    """
    task, items = mt_items
    prompts = [MaskedPrompt.of(it.encoded, get_condition("instructions+examples")) for it in items]
    layers = (0, gemma.info.num_layers)
    gens = FastEngine(gemma.model, gemma.tokenizer).generate(
        prompts, [MaskFrom(j) for j in layers], StopRule(task.stop_strings, task.max_new_tokens)
    )
    answers = {j: [post_process(task, gens[(i, MaskFrom(j))].text) for i in range(len(items))] for j in layers}
    return answers, prompts


def test_baseline_translates(gemma, mt_items, masked_answers):
    _, items = mt_items
    answers, _ = masked_answers
    bleu = translation_scores(answers[gemma.info.num_layers], [it.item.target for it in items]).bleu
    print(f"gemma-3-270m fra->eng 5-shot baseline BLEU on 8 devtest sentences: {bleu:.2f}")
    assert bleu > 15


def test_masking_context_from_layer_0_destroys_translation(gemma, mt_items, masked_answers):
    _, items = mt_items
    answers, prompts = masked_answers
    bleu = translation_scores(answers[0], [it.item.target for it in items]).bleu
    print(f"gemma-3-270m fra->eng instructions+examples masked from layer 0: BLEU {bleu:.2f}")
    assert bleu < 5
    tok = gemma.tokenizer
    for p, item in zip(prompts, items):
        ((start, end),) = p.hidden
        header_end = item.prompt.char_spans["query"][0]
        assert start == 1  # BOS stays visible
        assert tok.decode(p.ids[start:end]) == item.prompt.text[:header_end]
        assert item.prompt.text[:header_end].startswith("Translate French to English:\nQ:")
        assert tok.decode(p.ids[end:]) == item.prompt.text[header_end:]  # the query stays


@pytest.mark.parametrize("condition,layer", [("baseline", None), ("instructions+examples", 4)])
def test_cli_run_translation(gemma, data_dir, tmp_path, capsys, condition, layer):
    out = tmp_path / "run.jsonl"
    argv = [
        "run",
        "--model",
        "gemma-3-270m",
        "--pair",
        "fra-eng",
        "--condition",
        condition,
        "--n-test",
        "2",
        "--data-dir",
        str(data_dir),
        "--out",
        str(out),
    ] + (["--from-layer", str(layer)] if layer else [])
    assert main(argv) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 2 and all(r["generation"] for r in rows)
    assert "corpus BLEU" in capsys.readouterr().out


@pytest.mark.parametrize("condition,layer", [("baseline", None), ("instructions+examples", 0)])
def test_cli_run_code_generation(gemma, data_dir, tmp_path, capsys, condition, layer):
    out = tmp_path / "code.jsonl"
    argv = [
        "run",
        "--model",
        "gemma-3-270m",
        "--task",
        "humaneval",
        "--condition",
        condition,
        "--n-test",
        "2",
        "--k",
        "2",
        "--max-new-tokens",
        "48",
        "--data-dir",
        str(data_dir),
        "--out",
        str(out),
    ]
    argv += ["--from-layer", str(layer)] if layer is not None else []
    assert main(argv) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["example_id"] for r in rows] == ["HumanEval/0", "HumanEval/1"]
    assert all(r["result"] in ("passed", "failed", "timed out") for r in rows)
    assert "pass@1" in capsys.readouterr().out
    assert rows[0]["prompt"].startswith("Write a program for the following task:\n\nQ:")


def test_fast_engine_matches_reference_on_gemma(gemma, mt_items):
    task, items = mt_items
    items = items[:2]
    cond = get_condition("instructions+examples")
    layers = [0, 9, 18]  # masked everywhere, from the middle, nowhere
    # 32 new tokens: layers 9 and 18 end at their stop string before it; layer 0, unstoppable, ends at the bound.
    stop = StopRule(task.stop_strings, 32)
    fast = FastEngine(gemma.model, gemma.tokenizer).generate(
        [MaskedPrompt.of(it.encoded, cond) for it in items], [MaskFrom(j) for j in layers], stop
    )
    # All six rows decode batched; three of them (each layer once, both items) go through the slow reference.
    for i, j in [(0, 0), (1, 9), (0, 18)]:
        encoded = items[i].encoded
        ranges = hidden_ranges(cond, encoded.spans, len(encoded.ids)) if j < 18 else []
        plan = [ColumnMask.at_layers([ranges], range(j, 18))] if ranges else []
        ref = greedy_decode(gemma.model, gemma.tokenizer, encoded.ids, plan, stop)
        assert fast[(i, MaskFrom(j))].token_ids == ref.token_ids, (i, j)


def test_real_curve_gets_a_recognition_layer(gemma, data_dir, tmp_path, capsys):
    """The weak-baseline verdict stays away from a model that really translates."""
    assert (
        main(
            [
                "sweep",
                "--pairs",
                "fra-eng",
                "--conditions",
                "instructions+examples",
                "--n-test",
                "6",
                "--layers",
                "0,9,18",
                "--data-dir",
                str(data_dir),
                "--store",
                str(tmp_path / "s.sqlite"),
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "instructions+examples (instr, k=5): baseline BLEU" in out
    assert "no recognition layer" not in out and "; recognition layer " in out
