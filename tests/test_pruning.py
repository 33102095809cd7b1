"""Context-pruned inference equals masking the same range from layer r, and really skips the work."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from conftest import tiny
from icl_locate.cli import main
from icl_locate.core.conditions import MaskedPrompt, get_condition, hidden_ranges
from icl_locate.core.interventions import ColumnMask, MaskFrom, PruneFrom
from icl_locate.core.structure import decoder_layers
from icl_locate.engines.base import Generation, StopRule, forward
from icl_locate.engines.fast import FastEngine
from icl_locate.engines.pruned import PrunedEngine, prune_split
from icl_locate.engines.screens import SCREENS, build_screen
from icl_locate.experiments import prune
from icl_locate.experiments.prune import check_masked, stored_masked
from icl_locate.results.store import Store
from icl_locate.tasks.items import build_items
from icl_locate.tasks.loaders import load_data
from icl_locate.tasks.registry import get_task
from icl_locate.tasks.spec import TaskOptions
from icl_locate.util.errors import UserError
from test_fast_engine import encoded_prompts, masked, reference

FAMILIES = ["llama", "gemma3", "qwen2", "starcoder2", "gpt2", "gpt_neox", "mistral"]


def assert_pruned_equals_masked(lm, encs, condition, layers, batch_size=2, max_new=6, stop=()):
    """Generations equal token for token, first-step logits to 1e-4; returns the largest logit change
    that pruning caused against r = L (a test that sees none could not catch a no-op)."""
    n = lm.info.num_layers
    logits = {}
    for r in layers:
        engine = PrunedEngine(lm.model, lm.tokenizer, batch_size=batch_size, keep_first_logits=True)
        results = engine.generate(masked(encs, condition), [PruneFrom(r)], StopRule(tuple(stop), max_new))
        got = [results[(i, PruneFrom(r))] for i in range(len(encs))]
        for i, enc in enumerate(encs):
            ref = reference(lm, enc, condition, MaskFrom(r), stop, max_new)
            assert (got[i].token_ids, got[i].finish) == (ref.token_ids, ref.finish), (condition.name, r, i)
            ranges = hidden_ranges(condition, enc.spans, len(enc.ids)) if r < n else []
            plan = [ColumnMask.at_layers([ranges], range(r, n))] if ranges else []
            expected = forward(lm.model, torch.tensor([enc.ids]), interventions=plan, last_only=True).logits[0, -1]
            torch.testing.assert_close(engine.first_logits[i], expected.float(), atol=1e-4, rtol=1e-4)
        logits[r] = torch.stack([engine.first_logits[i] for i in range(len(encs))])
    if n not in logits:
        return float("nan")
    return max(float((logits[r] - logits[n]).abs().max()) for r in layers)


@pytest.mark.parametrize("family", FAMILIES)
def test_pruned_equals_masked_every_layer(family):
    lm = tiny(family)
    change = assert_pruned_equals_masked(
        lm, encoded_prompts(lm.tokenizer), get_condition("instructions+examples"), range(lm.info.num_layers + 1)
    )
    assert change > 1e-2, "pruning never changed the logits: the test could not catch a no-op"


@pytest.mark.parametrize("family", ["llama", "gemma3"])
@pytest.mark.parametrize("condition", ["examples", "instructions", "all-but-last", "baseline"])
def test_pruned_other_ranges_and_per_query_prompts(family, condition):
    lm = tiny(family)
    for shared in (True, False):  # per-query prompts: contexts (and pruned widths) differ by row
        assert_pruned_equals_masked(
            lm,
            encoded_prompts(lm.tokenizer, shared=shared),
            get_condition(condition),
            (0, 1, 3, lm.info.num_layers),
            batch_size=3,
        )


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("kind", sorted(SCREENS))
def test_a_screened_head_decodes_the_reference_tokens(family, kind):
    """Full and pruned runs, and the fast engine that checks them, pick the model's own head's tokens with a
    screened LM head."""
    lm = tiny(family)
    screen, why_not = build_screen(lm.model, kind)
    assert screen is not None, why_not
    encs, condition, stop = encoded_prompts(lm.tokenizer), get_condition("instructions+examples"), StopRule((), 6)
    for r in (0, 2, lm.info.num_layers):
        gens = PrunedEngine(lm.model, lm.tokenizer, batch_size=2, head=screen).generate_pruned(
            masked(encs, condition), r, stop
        )
        before = screen.stats["rows"]
        fast = FastEngine(lm.model, lm.tokenizer, screen=screen).generate(masked(encs, condition), [MaskFrom(r)], stop)
        assert screen.stats["rows"] > before  # the fast engine's tokens came from the screen
        for i, enc in enumerate(encs):
            ref = reference(lm, enc, condition, MaskFrom(r), (), 6)
            assert (gens[i].token_ids, gens[i].finish) == (ref.token_ids, ref.finish), (kind, r, i)
            assert fast[(i, MaskFrom(r))].token_ids == ref.token_ids, (kind, r, i)
    assert screen.stats["rows"] > 0  # the screen picked the tokens


def test_pruned_early_stopping():
    lm = tiny("llama")
    encs = encoded_prompts(lm.tokenizer)
    first = reference(lm, encs[0], None, MaskFrom(lm.info.num_layers), max_new=12)
    stop = (lm.tokenizer.decode(first.token_ids[2:3]),)
    assert_pruned_equals_masked(lm, encs, get_condition("instructions+examples"), (0, 2, 4), max_new=12, stop=stop)


def test_pruned_tokens_never_reach_layers_from_r():
    """Count the tokens each decoder layer processes (completed forwards): the pruned range stops below r."""
    lm = tiny("llama")
    n = lm.info.num_layers
    encs = encoded_prompts(lm.tokenizer)
    condition = get_condition("instructions+examples")
    r = 2
    seen = [0] * n
    handles = [
        layer.register_forward_hook(
            lambda module, args, kwargs, out, i=i: seen.__setitem__(i, seen[i] + _tokens(args, kwargs)),
            with_kwargs=True,
        )
        for i, layer in enumerate(decoder_layers(lm.model))
    ]
    try:
        engine = PrunedEngine(lm.model, lm.tokenizer, batch_size=1)
        gens = engine.generate_pruned(masked(encs, condition), r, StopRule((), 5))
    finally:
        for h in handles:
            h.remove()
    splits = [prune_split(p) for p in masked(encs, condition)]
    fed = [len(e.ids) + len(g.token_ids) - 1 + (g.finish == "eos") for e, g in zip(encs, gens)]
    assert all(seen[i] == sum(fed) for i in range(r))
    assert all(seen[i] == sum(fed) - sum(s.width for s in splits) for i in range(r, n))
    assert min(s.width for s in splits) > 10  # the context really is most of the prompt
    assert engine.stats["token_layers"] == sum(seen)


def _tokens(args, kwargs) -> int:
    hidden = args[0] if args else kwargs["hidden_states"]
    return hidden.shape[0] * hidden.shape[1]


def test_pruned_cache_holds_no_context_from_r():
    lm = tiny("llama")
    n = lm.info.num_layers
    encs = encoded_prompts(lm.tokenizer)[:1]
    condition = get_condition("instructions+examples")
    width = prune_split(masked(encs, condition)[0]).width
    kv = {}
    for r in (0, 2, n):
        engine = PrunedEngine(lm.model, lm.tokenizer)
        engine.generate_pruned(masked(encs, condition), r, StopRule((), 3))
        kv[r] = engine.stats["kv_bytes_peak"]
    per_column = kv[n] / n / (len(encs[0].ids) - 1 + 3)  # bytes per layer and stored column
    assert kv[0] == pytest.approx(kv[n] - n * width * per_column)
    assert kv[2] == pytest.approx(kv[n] - (n - 2) * width * per_column)


def test_refuses_what_it_cannot_prune():
    lm = tiny("gpt_neo")
    with pytest.raises(UserError, match="AttentionInterface"):
        PrunedEngine(lm.model, lm.tokenizer)
    llama = tiny("llama")
    enc = encoded_prompts(llama.tokenizer)[0]
    with pytest.raises(UserError, match="last prompt token"):
        prune_split(MaskedPrompt.of(enc, get_condition("instructions+examples+query")))
    with pytest.raises(UserError, match="0..4"):
        PrunedEngine(llama.model, llama.tokenizer).generate(
            masked([enc], get_condition("examples")), [PruneFrom(9)], StopRule()
        )
    with pytest.raises(ValueError, match="PruneFrom rows only"):
        PrunedEngine(llama.model, llama.tokenizer).generate(
            masked([enc], get_condition("examples")), [MaskFrom(2)], StopRule()
        )


# --------------------------------------------------------------------------- the command


def test_prune_command_on_tiny_model(tmp_path, capsys, data_dir):
    out = tmp_path / "prune.json"
    code = main(
        [
            "prune",
            "--model",
            "tiny:llama",
            "--n-test",
            "3",
            "--layer",
            "2",
            "--k",
            "2",
            "--data-dir",
            str(data_dir),
            "--json",
            str(out),
            "--max-new-tokens",
            "8",
        ]
    )
    assert code == 0
    data = json.loads(out.read_text())
    assert data["identical_to_masked"] == 3 and data["from_layer"] == 2
    assert 0 < data["flops_saved_prompt"] < 1 and data["kv_saved"] > 0
    assert data["full"]["token_layers"] > data["pruned"]["token_layers"]
    assert "pruned == masked-from-r" in capsys.readouterr().out
    assert [p.name for p in tmp_path.iterdir()] == ["prune.json"]  # no temporary file left behind
    assert data["head"]["kind"] in ("plain", *SCREENS) and data["head"]["reason"]


def test_prune_command_honours_a_forced_head(tmp_path, capsys, data_dir, monkeypatch):
    out = tmp_path / "prune.json"
    args = ["prune", "--model", "tiny:llama", "--n-test", "2", "--layer", "2", "--k", "2", "--max-new-tokens", "6"]
    events = []  # each run's memory is measured from what the process needs: freed memory handed back first
    monkeypatch.setattr(prune, "return_free_memory", lambda gpu_cache: events.append(f"hand back, gpu {gpu_cache}"))
    monkeypatch.setattr(prune, "reset_peak_rss", lambda: events.append("reset peak"))
    assert main([*args, "--head", "int8", "--data-dir", str(data_dir), "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["head"]["kind"] == "int8" and data["head"]["reason"].startswith("forced")
    assert data["identical_to_masked"] == 2
    assert "head: int8 (forced" in capsys.readouterr().err
    assert events == ["hand back, gpu False", "reset peak"] * 2  # the full run, the pruned run (GPU cache kept)


def test_prune_command_bad_input(tmp_path, capsys, data_dir):
    for args, message in (
        (["--layer", "99"], "0..4"),
        (["--layer", "2", "--condition", "query+nonsense"], "unknown condition"),
        (["--layer", "2", "--model", "tiny:gpt_neo"], "AttentionInterface"),
    ):
        out = tmp_path / "x.json"
        code = main(
            [
                "prune",
                "--model",
                "tiny:llama",
                "--n-test",
                "2",
                "--k",
                "1",
                "--data-dir",
                str(data_dir),
                "--json",
                str(out),
                *args,
            ]
        )
        assert code == 2
        assert message in capsys.readouterr().err
        assert not out.exists()


@pytest.mark.slow
def test_pruned_gemma_equals_fast_engine(gemma, data_dir):
    task = get_task("flores")
    data = load_data(task, TaskOptions(data_dir=str(data_dir), pair="fra-eng"))
    items = build_items(task, data, gemma.tokenizer, k=5, seed=0, n_test=2)
    prompts = masked([it.encoded for it in items], get_condition("instructions+examples"))
    stop = StopRule(task.stop_strings, 24)  # equal tokens, not whole translations, are what is compared
    screen, why_not = build_screen(gemma.model, "int8")
    assert screen is not None, why_not
    # nothing of the context processed (the model's own head); pruned from the middle (the curve's
    # recognition layer), greedy tokens by the int8 screen as `prune` picks them on most CPUs
    for r, head in ((0, None), (9, screen)):
        pruned = PrunedEngine(gemma.model, gemma.tokenizer, head=head).generate_pruned(prompts, r, stop)
        fast = FastEngine(gemma.model, gemma.tokenizer).generate(prompts, [MaskFrom(r)], stop)
        assert [g.token_ids for g in pruned] == [fast[(i, MaskFrom(r))].token_ids for i in range(2)]


def test_prune_result_kept_in_study_store_and_reported(tmp_path, capsys, data_dir):
    store = tmp_path / "study.sqlite"
    common = [
        "--model",
        "tiny:llama",
        "--k",
        "1",
        "--n-test",
        "2",
        "--max-new-tokens",
        "6",
        "--data-dir",
        str(data_dir),
    ]
    assert (
        main(
            [
                "sweep",
                "--model",
                "tiny:llama",
                "--pairs",
                "fra-eng",
                "--conditions",
                "instructions+examples",
                "--seeds",
                "0",
                "--ks",
                "1",
                "--n-test",
                "2",
                "--max-new-tokens",
                "6",
                "--layers",
                "0,2,4",
                "--data-dir",
                str(data_dir),
                "--store",
                str(store),
            ]
        )
        == 0
    )
    # the sweep stored both prompts masked from 2: the check reads them instead of decoding them again
    assert main(["prune", *common, "--layer", "2", "--store", str(store)]) == 0
    assert "(2 settled by the store's layer-sweep rows, 0 by the fast engine)" in capsys.readouterr().out
    # another model's store is refused, and the store is left as it was
    assert main(["prune", *common[2:], "--model", "tiny:gemma3", "--layer", "2", "--store", str(store)]) == 2
    assert "holds model 'tiny:llama'" in capsys.readouterr().err
    with Store(store, create=False) as db:
        (result,) = db.pruning_results()
        assert (result["identical_to_masked"], result["checked_by_store"], result["checked_by_fast_engine"]) == (
            2,
            2,
            0,
        )
        sweep_rows = db.predictions_at("mask", 2, dict(condition="instructions+examples"))
        assert [row["raw_generation"] for row in sweep_rows] == result["pruned"]["generations"]
        # the stored rows apply to the very prompts, layer and token limit only
        task = get_task("flores")
        data = load_data(task, TaskOptions(data_dir=str(data_dir), pair="fra-eng"))
        items = build_items(task, data, tiny("llama").tokenizer, k=1, seed=0, n_test=2)
        prompts = masked([it.encoded for it in items], get_condition("instructions+examples"))
        stop = StopRule(task.stop_strings, 6)
        found = stored_masked(db, task, "instructions+examples", prompts, 2, stop)
        assert [found[i][0] for i in range(2)] == result["pruned"]["generations"]
        assert stored_masked(db, task, "examples", prompts, 2, stop) == {}
        assert stored_masked(db, task, "instructions+examples", prompts, 1, stop) == {}
        assert stored_masked(db, task, "instructions+examples", prompts, 2, StopRule(task.stop_strings, 7)) == {}
        assert stored_masked(db, task, "instructions+examples", prompts[1:], 2, stop) == {0: found[1]}
        # a row without the prompt's tokens (not written by this version) is passed over, not read
        first, where = sweep_rows[0], "WHERE unit_id = ? AND item = ? AND variant = 'mask' AND layer = 2"
        key = (first["unit_id"], first["item"])
        db.db.execute(f"UPDATE predictions SET prompt_token_ids = NULL {where}", key)
        other = 1 - first["item"]
        assert stored_masked(db, task, "instructions+examples", prompts, 2, stop) == {other: found[other]}
        db.db.execute(f"UPDATE predictions SET prompt_token_ids = ? {where}", (first["prompt_token_ids"], *key))
    out = tmp_path / "report"
    assert main(["report", str(store), "--out-dir", str(out), "--format", "md", "--bootstrap", "20"]) == 0
    text = (out / "report.md").read_text()
    assert "Context-pruned inference (measured)" in text and "| 2 / 4 |" in text
    assert "2/2 (2 by the sweep's stored rows)" in text
    # prune's engine, its measured head and the machine are in its run record, and in the report's footer
    pruned_line = text.split("engine pruned (")[1].split("\n")[0]
    assert "head " in pruned_line and "the same in the full and the pruned runs" in pruned_line
    assert "threads" in pruned_line
    # a layer the sweep did not run, another token limit: nothing stored applies, the fast engine decodes all
    for args in (["--layer", "1"], ["--layer", "2", "--max-new-tokens", "5"]):
        assert main(["prune", *common, *args, "--store", str(store)]) == 0
        assert "(0 settled by the store's layer-sweep rows, 2 by the fast engine)" in capsys.readouterr().out


class _Decoder:
    """A masked engine that returns given tokens and records the prompts it was asked for."""

    def __init__(self, tokens: dict[int, list[int]]):
        self.tokens, self.asked = tokens, []

    def generate(self, prompts, rows, stop):
        self.asked = [p.ids[0] for p in prompts]  # each prompt's first id is its number here
        return {(n, row): Generation(self.tokens[p.ids[0]], "", "stop") for n, p in enumerate(prompts) for row in rows}


def test_the_check_settles_by_stored_rows_and_decodes_the_rest():
    pruned = [Generation([5, 6], "a b", "stop"), Generation([7], "c", "stop"), Generation([8], "d", "length")]
    prompts = [SimpleNamespace(ids=(i, 9)) for i in range(3)]  # the check hands prompts to the engine only
    # prompt 0 stored alike; prompt 1 stored with another finish (decoded again: the engine agrees); prompt 2
    # not stored (decoded: the engine disagrees)
    engine = _Decoder({1: [7], 2: [3]})
    stored = {0: ("a b", "stop"), 1: ("c", "length")}
    identical, by = check_masked(pruned, prompts, 1, StopRule(), engine, stored)  # pyright: ignore[reportArgumentType]
    assert (identical, by, engine.asked) == (2, dict(store=1, fast_engine=2), [1, 2])
