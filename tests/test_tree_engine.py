"""The tree engine (cross-layer sharing) equals the fast engine and the reference, token for token;
its shared states are the unmasked run's, stored once; its screened head is checked on the model."""

from __future__ import annotations

import json
import sqlite3

import pytest
import torch
from transformers import DynamicCache

from conftest import tiny
from icl_locate.cli import main
from icl_locate.core.conditions import get_condition
from icl_locate.core.interventions import UNCHANGED, AblateLayers, HeadMask, MaskFrom
from icl_locate.engines import fast, tree, tree_decode
from icl_locate.engines.base import StopRule, forward, last_hidden
from icl_locate.engines.decoding import SlotLayer
from icl_locate.engines.drafts import Drafter, accepted_tokens
from icl_locate.engines.fast import FastEngine
from icl_locate.engines.head import Bf16ScreenedHead
from icl_locate.engines.reference import ReferenceEngine, batch_interventions
from icl_locate.engines.slot_order import hole_filling_order
from icl_locate.engines.tree import TreeEngine, query_batches, query_states
from icl_locate.engines.tree_decode import TreeDecode
from test_fast_engine import FAMILIES, encoded_prompts, masked, reference


def generations(engine, encs, condition, rows, stop=(), max_new=8):
    out = engine.generate(masked(encs, condition), rows, StopRule(tuple(stop), max_new))
    return {k: (g.token_ids, g.finish) for k, g in out.items()}


def assert_tree_equals(lm, encs, condition, rows, stop=(), max_new=8, batch_size=None, check_reference=True):
    tree = TreeEngine(lm.model, lm.tokenizer, batch_size=batch_size)
    got = generations(tree, encs, condition, rows, stop, max_new)
    fast = generations(FastEngine(lm.model, lm.tokenizer, batch_size=batch_size), encs, condition, rows, stop, max_new)
    assert got == fast
    if check_reference:  # the engine-level oracle: one prompt, one row at a time
        ref = generations(ReferenceEngine(lm.model, lm.tokenizer), encs, condition, rows, stop, max_new)
        assert got == ref
    return tree, got


def shared_then_split(got: dict, rows) -> bool:
    """Some two rows of one query agree on at least one token and then differ."""
    by_item: dict[int, list[list[int]]] = {}
    for (item, _), (tokens, _) in got.items():
        by_item.setdefault(item, []).append(tokens)
    for seqs in by_item.values():
        for a in seqs:
            for b in seqs:
                n = next((p for p, (x, y) in enumerate(zip(a, b)) if x != y), None)
                if n is not None and n >= 1:
                    return True
    return False


@pytest.mark.parametrize("family", FAMILIES)
def test_every_layer_every_family(family):
    lm = tiny(family)
    rows = [MaskFrom(j) for j in range(lm.info.num_layers + 1)] + [UNCHANGED]
    tree, _ = assert_tree_equals(lm, encoded_prompts(lm.tokenizer), get_condition("instructions+examples"), rows)
    assert tree.stats["prefix_forwards"] == 1
    # the query's prefill alone already runs fewer states than rows at every layer but the last
    assert all(s < r for s, r in zip(tree.stats["slot_tokens"][:-1], tree.stats["row_tokens"][:-1]))


@pytest.mark.parametrize("family", ["llama", "gpt_neo", "bloom"])
@pytest.mark.parametrize(
    "condition", ["query", "instructions+examples+query", "instructions", "examples", "all-but-last", "baseline"]
)
def test_every_condition(family, condition):
    lm = tiny(family)
    rows = [MaskFrom(j) for j in range(lm.info.num_layers + 1)]
    assert_tree_equals(lm, encoded_prompts(lm.tokenizer), get_condition(condition), rows)


def test_rows_share_a_history_then_diverge():
    """On the tiny llama, rows of one query agree for a while and then split; results stay exact."""
    lm = tiny("llama")
    rows = [MaskFrom(j) for j in range(lm.info.num_layers + 1)]
    tree, got = assert_tree_equals(
        lm, encoded_prompts(lm.tokenizer), get_condition("instructions+examples"), rows, max_new=12
    )
    assert tree.stats["splits"] > 0
    assert shared_then_split(got, rows)


def buffer_addresses(monkeypatch) -> dict[int, set[int]]:
    """Per slot layer (by id; the layers are kept alive, so no id is reused), the addresses its keys' buffer
    had before and after each ``rearrange``."""
    seen: dict[int, set[int]] = {}
    layers: list[SlotLayer] = []
    real = SlotLayer.rearrange

    def rearrange(self, keep, copies):
        layers.append(self)
        seen.setdefault(id(self), set()).add(self.buf_k.data_ptr())
        real(self, keep, copies)
        seen[id(self)].add(self.buf_k.data_ptr())

    monkeypatch.setattr(SlotLayer, "rearrange", rearrange)
    return seen


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the buffers grow as slots come")
def test_on_a_cpu_the_slots_have_room_from_the_start(monkeypatch):
    """Slots come as rows split and go as rows finish, in each layer's buffer as it was allocated (room for
    every member of the batch: a CPU takes its pages only when written), never a copy into a larger one."""
    seen = buffer_addresses(monkeypatch)
    lm = tiny("llama")
    rows = [MaskFrom(j) for j in range(lm.info.num_layers + 1)]
    tree, _ = assert_tree_equals(
        lm, encoded_prompts(lm.tokenizer), get_condition("instructions+examples"), rows, max_new=12
    )
    assert tree.stats["splits"] > 0 and seen and all(len(addresses) == 1 for addresses in seen.values())


@pytest.mark.parametrize("length,wrong_at", [(None, None), (4, 2)])
def test_buffers_that_grow_as_slots_come_decode_the_same(monkeypatch, length, wrong_at):
    """Where no room is reserved (a GPU), a layer's buffer grows when a slot comes to a full one: the
    same tokens, with and without drafts."""
    monkeypatch.setattr(tree_decode, "slot_room", lambda device, members: None)
    seen = buffer_addresses(monkeypatch)
    lm = tiny("llama")
    encs = encoded_prompts(lm.tokenizer)
    condition = get_condition("instructions+examples")
    rows = [MaskFrom(j) for j in range(lm.info.num_layers + 1)] + [UNCHANGED]
    if length is None:
        engine = TreeEngine(lm.model, lm.tokenizer)
    else:
        engine = _oracle_engine(lm, encs, rows, condition, length, wrong_at)
    got = generations(engine, encs, condition, rows, max_new=12)
    assert got == generations(ReferenceEngine(lm.model, lm.tokenizer), encs, condition, rows, max_new=12)
    assert any(len(addresses) > 1 for addresses in seen.values())  # some buffer grew


@pytest.mark.parametrize("family", ["llama", "gemma3", "gpt_neo"])
def test_per_query_prompts_and_small_batches(family):
    """Left padding across queries of different lengths and contexts; batches smaller than a query's rows."""
    lm = tiny(family)
    rows = [MaskFrom(j) for j in (0, 1, 3, lm.info.num_layers)]
    for batch_size in (2, 3, None):
        assert_tree_equals(
            lm,
            encoded_prompts(lm.tokenizer, shared=False),
            get_condition("examples"),
            rows,
            batch_size=batch_size,
            check_reference=batch_size is None,
        )


@pytest.mark.parametrize("family", ["llama", "bloom", "gpt2"])
def test_stop_strings(family):
    lm = tiny(family)
    encs = encoded_prompts(lm.tokenizer)
    first = reference(lm, encs[0], None, MaskFrom(lm.info.num_layers), max_new=12)
    stop = (lm.tokenizer.decode(first.token_ids[2:3]),)
    assert_tree_equals(
        lm,
        encs,
        get_condition("instructions+examples"),
        [MaskFrom(j) for j in range(lm.info.num_layers + 1)],
        stop=stop,
        max_new=12,
    )


def test_eos_ends_some_rows_of_a_group():
    """A token the unmasked run produces is made EOS: rows that produce it end there, the others go on."""
    lm = tiny("llama")
    encs = encoded_prompts(lm.tokenizer)
    first = reference(lm, encs[0], None, MaskFrom(lm.info.num_layers), max_new=12)
    config = lm.model.generation_config
    saved = config.eos_token_id
    try:
        config.eos_token_id = first.token_ids[3]
        rows = [MaskFrom(j) for j in range(lm.info.num_layers + 1)]
        _, got = assert_tree_equals(lm, encs, get_condition("instructions+examples"), rows, max_new=12)
    finally:
        config.eos_token_id = saved
    finishes = {finish for _, finish in got.values()}
    assert "eos" in finishes and "length" in finishes


@pytest.mark.parametrize("family", ["llama", "gemma3", "bloom", "gpt_neo"])
def test_layer_ablation_and_head_masks(family):
    lm = tiny(family)
    L = lm.info.num_layers
    rows = [AblateLayers(frozenset({layer})) for layer in range(L)]
    rows += [HeadMask(frozenset({(1, 0)})), HeadMask(frozenset({(0, 1), (L - 1, 0)})), MaskFrom(1), UNCHANGED]
    assert_tree_equals(lm, encoded_prompts(lm.tokenizer), get_condition("instructions+examples"), rows)


@pytest.mark.parametrize("family", ["llama", "gemma3", "gpt_neo", "bloom"])
def test_shared_states_are_the_unmasked_run_and_stored_once(family):
    """After the query's prefill, the keys/values of the shared slot at layer l are the unmasked run's
    (1e-5), and layer l holds 1 + (l + 1) slots for the L + 1 rows of a full layer sweep."""
    lm = tiny(family)
    L = lm.info.num_layers
    enc = encoded_prompts(lm.tokenizer)[1]
    engine = TreeEngine(lm.model, lm.tokenizer)
    rows = engine.plan(masked([enc], get_condition("instructions+examples")), [MaskFrom(j) for j in range(L + 1)])
    decode = TreeDecode(engine, rows, engine.prefix_caches(rows), StopRule((), 4))
    with engine.slot_hooks():
        decode.forward(0)
    plain = forward(lm.model, torch.tensor([enc.ids]), cache=DynamicCache())
    for layer in range(L):
        keys = decode.keys[layer]
        assert len(keys) == layer + 2  # the shared slot + own slots of rows j = 0..layer
        shared = keys.index(("shared", 0))
        cached = decode.cache.layers[layer]
        assert cached.keys.shape[2] == len(enc.ids)
        expected_k, expected_v = plain.cache.layers[layer].keys[0], plain.cache.layers[layer].values[0]
        torch.testing.assert_close(cached.keys[shared], expected_k, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(cached.values[shared], expected_v, atol=1e-5, rtol=1e-5)
    per_slot = [c.used_bytes() // c.rows for c in decode.cache.layers]
    assert sum(c.used_bytes() for c in decode.cache.layers) == sum((layer + 2) * b for layer, b in enumerate(per_slot))
    assert sum(c.used_bytes() for c in decode.cache.layers) < (L + 1) * sum(per_slot)


def test_slicing_refuses_an_unknown_per_row_argument():
    with pytest.raises(RuntimeError, match="does not know whether"):
        TreeEngine.slice_argument("mystery", torch.zeros(3, 2), torch.tensor([0, 2]), 3)
    alibi = torch.arange(3 * 2 * 5.0).view(6, 1, 5)  # 3 rows x 2 heads
    sliced = TreeEngine.slice_argument("alibi", alibi, torch.tensor([2, 0]), 3)
    assert torch.equal(sliced, torch.cat([alibi[4:6], alibi[0:2]]))


# --------------------------------------------------------------------------- the screened head


def test_engine_checks_the_screen_on_the_model():
    lm = tiny("gemma3")
    assert TreeEngine(lm.model, lm.tokenizer).head is not None
    assert TreeEngine(lm.model, lm.tokenizer, head_kind="plain").head is None
    assert TreeEngine(lm.model, lm.tokenizer, head_kind="int8").head.kind == "int8"
    head = lm.model.get_output_embeddings()
    original = head.forward
    try:  # a model whose logits are not the plain head's: the screen is refused
        head.forward = lambda x: original(x) * 2.0
        engine = TreeEngine(lm.model, lm.tokenizer)
        assert engine.head is None and "not softcap" in engine.head_note
        with pytest.raises(ValueError, match="cannot screen"):
            TreeEngine(lm.model, lm.tokenizer, head_kind="bf16")
    finally:
        head.forward = original


# --------------------------------------------------------------------------- commands


def test_bench_reports_the_tree_engine(tmp_path, data_dir):
    out = tmp_path / "bench.json"
    code = main(
        [
            "bench",
            "--model",
            "tiny:llama",
            "--n-test",
            "2",
            "--layers",
            "all",
            "--k",
            "1",
            "--data-dir",
            str(data_dir),
            "--json",
            str(out),
            "--require-identical",
            "1.0",
            "--engine",
            "tree",  # (d) as the tree engine, whatever the calibration would measure on this tiny model
        ]
    )
    assert code == 0
    data = json.loads(out.read_text())
    for key in (
        "seconds_spec",
        "speedup_spec_vs_paper",
        "speedup_spec_vs_fast",
        "identical_fraction_spec",
        "acceptance_rate",
        "flops_per_row_fast",
        "flops_per_row_spec",
        "flops_per_row_paper",
        "time_breakdown_fast",
        "time_breakdown_spec",
        "seconds_fast",
        "identical_fraction",
    ):
        assert key in data
    assert data["identical_fraction_spec"] == 1.0
    assert data["flops_per_row_spec"] < data["flops_per_row_fast"] < data["flops_per_row_paper"]


def test_sweep_engines_store_the_same_rows(tmp_path, data_dir):
    stores = {}
    for engine in ("tree", "fast"):
        stores[engine] = tmp_path / f"{engine}.sqlite"
        assert (
            main(
                [
                    "sweep",
                    "--model",
                    "tiny:llama",
                    "--n-test",
                    "2",
                    "--ks",
                    "1",
                    "--layers",
                    "all",
                    "--data-dir",
                    str(data_dir),
                    "--store",
                    str(stores[engine]),
                    "--engine",
                    engine,
                ]
            )
            == 0
        )
    query = "select unit_id, item, layer, generation from predictions order by 1, 2, 3"
    rows = [sqlite3.connect(stores[e]).execute(query).fetchall() for e in ("tree", "fast")]
    assert rows[0] == rows[1] and len(rows[0]) > 0


# --------------------------------------------------------------------------- drafts


class OracleDrafter:
    """Drafts from known generations: the continuation of the first reference row whose tokens
    start with the group's history, optionally corrupted at one position."""

    def __init__(self, references: dict[int, list[list[int]]], length: int, wrong_at: int | None = None):
        self.references, self.length, self.wrong_at = references, length, wrong_at
        self.proposed = 0

    def propose(self, group, prompt, siblings, limit):
        for ref in self.references[group.query]:
            if ref[: len(group.history)] == group.history and len(ref) > len(group.history):
                draft = ref[len(group.history) : len(group.history) + self.length]  # may exceed limit: the engine cuts
                if self.wrong_at is not None and self.wrong_at < len(draft):
                    draft[self.wrong_at] = (draft[self.wrong_at] + 1) % 50
                self.proposed += 1
                return draft
        return []

    def feedback(self, group, accepted):
        pass


def _oracle_engine(lm, encs, rows, condition, length, wrong_at=None, max_new=16):
    """A tree engine whose drafter knows the no-stop generations of every row."""
    plain = TreeEngine(lm.model, lm.tokenizer).generate(masked(encs, condition), rows, StopRule((), max_new + 8))
    references: dict[int, list[list[int]]] = {}
    for (item, _), gen in plain.items():
        references.setdefault(item, []).append(gen.token_ids)
    engine = TreeEngine(lm.model, lm.tokenizer, draft_tokens=length)
    engine.drafter = OracleDrafter(references, length, wrong_at)
    return engine


@pytest.mark.parametrize("family", ["llama", "bloom", "gpt2", "qwen2"])
@pytest.mark.parametrize("length,wrong_at", [(4, None), (4, 2), (3, 0), (40, None)])
def test_drafts_right_partly_right_wrong_and_too_long(family, length, wrong_at):
    lm = tiny(family)
    encs = encoded_prompts(lm.tokenizer)
    condition = get_condition("instructions+examples")
    rows = [MaskFrom(j) for j in range(lm.info.num_layers + 1)] + [UNCHANGED]
    engine = _oracle_engine(lm, encs, rows, condition, length, wrong_at)
    got = generations(engine, encs, condition, rows, max_new=16)
    assert got == generations(FastEngine(lm.model, lm.tokenizer), encs, condition, rows, max_new=16)
    stats = engine.stats
    assert engine.drafter.proposed > 0 and stats["draft_tokens"] > 0
    if wrong_at == 0:
        assert stats["draft_accepted"] == 0
    else:
        assert stats["draft_accepted"] > 0
        assert stats["steps"] < 16 * len(encs)  # fewer forwards than tokens


@pytest.mark.parametrize("family,position", [("llama", 4), ("qwen2", 3)])  # a token first produced there
def test_stop_string_and_eos_inside_drafts(family, position):
    lm = tiny(family)
    encs = encoded_prompts(lm.tokenizer)
    condition = get_condition("instructions+examples")
    rows = [MaskFrom(j) for j in range(lm.info.num_layers + 1)]
    first = reference(lm, encs[0], None, MaskFrom(lm.info.num_layers), max_new=12)
    stop = (lm.tokenizer.decode(first.token_ids[position : position + 1]),)
    engine = _oracle_engine(lm, encs, rows, condition, 6)  # drafts run past the stop string
    got = generations(engine, encs, condition, rows, stop=stop, max_new=16)
    assert got == generations(FastEngine(lm.model, lm.tokenizer), encs, condition, rows, stop=stop, max_new=16)
    assert any(finish == "stop" for _, finish in got.values()) and engine.stats["draft_accepted"] > 0
    config = lm.model.generation_config
    saved = config.eos_token_id
    engine = _oracle_engine(lm, encs, rows, condition, 6)  # drafts made without EOS: they run past it
    try:
        config.eos_token_id = first.token_ids[position]
        engine.eos = {first.token_ids[position]}
        got = generations(engine, encs, condition, rows, max_new=16)
        assert got == generations(FastEngine(lm.model, lm.tokenizer), encs, condition, rows, max_new=16)
    finally:
        config.eos_token_id = saved
    assert any(finish == "eos" for _, finish in got.values()) and engine.stats["draft_accepted"] > 0


def test_ngram_drafts_exact_on_every_condition():
    lm = tiny("llama")
    encs = encoded_prompts(lm.tokenizer)
    rows = [MaskFrom(j) for j in range(lm.info.num_layers + 1)] + [
        AblateLayers(frozenset({1})),
        HeadMask(frozenset({(1, 0)})),
    ]
    for condition in ("instructions+examples", "instructions", "query", "baseline"):
        engine = TreeEngine(lm.model, lm.tokenizer, draft_tokens=4)
        got = generations(engine, encs, get_condition(condition), rows, max_new=20)
        assert got == generations(FastEngine(lm.model, lm.tokenizer), encs, get_condition(condition), rows, max_new=20)
        assert engine.stats["draft_tokens"] > 0


def test_no_drafts_where_holes_would_shift_a_sliding_window():
    lm = tiny("gemma3")  # a 16-column window, prompts longer than that
    engine = TreeEngine(lm.model, lm.tokenizer, draft_tokens=4)
    generations(engine, encoded_prompts(lm.tokenizer), get_condition("instructions+examples"), [MaskFrom(1)])
    assert engine.stats["draft_tokens"] == 0


def test_drafter_lookup_order_and_backoff():
    group = type("G", (), {})()
    group.history, group.fails, group.pause = [5, 6, 7], 0, 0
    drafter = Drafter(max_tokens=3, patience=2)
    assert drafter.propose(group, prompt=[6, 7, 1, 2], siblings=[[9, 5, 6, 7, 8, 9, 10, 11]], limit=10) == [8, 9, 10]
    assert drafter.propose(group, prompt=[6, 7, 1, 2], siblings=[], limit=10) == [1, 2]  # 2-gram in the prompt
    group.history = [1, 2, 3, 1, 2]
    assert drafter.propose(group, prompt=[], siblings=[], limit=2) == [3, 1]  # own loop
    assert drafter.propose(group, prompt=[], siblings=[], limit=0) == []
    drafter.feedback(group, 0)
    assert group.pause == 0
    drafter.feedback(group, 0)
    assert group.pause == 2
    assert drafter.propose(group, prompt=[], siblings=[], limit=2) == []
    assert drafter.propose(group, prompt=[], siblings=[], limit=2) == []
    assert drafter.propose(group, prompt=[], siblings=[], limit=2) == [3, 1]
    drafter.feedback(group, 1)
    assert group.fails == 0


def test_a_row_takes_its_predictions_while_they_match_the_draft_fed_and_the_one_after():
    """A step fed [last, d1, d2, d3] predicts one token per position: the prediction at a draft position
    counts only if every draft token before it was the model's own prediction."""
    assert accepted_tokens([7, 8, 2, 4], [7, 8, 3]) == [7, 8, 2]  # d3 missed: the model's token replaces it
    assert accepted_tokens([7, 8, 3, 6], [7, 8, 3]) == [7, 8, 3, 6]  # all matched: one more than drafted
    assert accepted_tokens([5, 8, 3, 6], [7, 8, 3]) == [5]  # a first miss: later matches do not count
    assert accepted_tokens([5], []) == [5]


class RecordingHead:
    """The model's own head, computed in full, recording the final hidden states it is given."""

    def __init__(self, model):
        self.full = Bf16ScreenedHead(model)
        self.hidden: torch.Tensor | None = None

    def argmax(self, hidden):
        self.hidden = hidden.detach().clone()
        return self.full.full_logits(hidden).argmax(-1)


@pytest.mark.parametrize("family", ["llama", "qwen2"])  # families whose tiny models split groups on these prompts
@pytest.mark.parametrize("wrong_at", [None, 1])
def test_every_live_slot_equals_a_batch_of_one_run_of_its_row(family, wrong_at):
    """At every decoding step, with groups that split and drafts that are rejected (holes in the
    cache), each live member's keys/values at every layer (its own or its group's shared slot) and
    its final hidden state equal a batch-of-one run on that row's prompt and history under its own
    mask (1e-5, fp32)."""
    lm = tiny(family)
    L = lm.info.num_layers
    encs = encoded_prompts(lm.tokenizer)
    condition = get_condition("instructions+examples")
    prompts = masked(encs, condition)
    interventions = [MaskFrom(j) for j in range(L + 1)]
    engine = _oracle_engine(lm, encs, interventions, condition, 3, wrong_at)
    engine.head = RecordingHead(lm.model)
    rows = engine.plan(prompts, interventions)
    decode = TreeDecode(engine, rows, engine.prefix_caches(rows), StopRule((), 12))
    checked_steps = splits_seen = holes_seen = 0
    with engine.slot_hooks():
        step = 0
        while decode.alive:
            drafts = decode.drafts() if step else {}
            alive = list(decode.alive)
            before = {m: len(decode.members[m].tokens) for m in alive}
            predicted = decode.forward(step, drafts)
            leaves = dict(zip(alive, decode.leaf_of))
            width = engine.head.hidden.shape[0] // len(decode.keys[-1])
            hidden = engine.head.hidden.view(len(decode.keys[-1]), width, -1)
            decode.advance(predicted, drafts)
            step += 1
            for m in decode.alive:
                member = decode.members[m]
                prompt, row = prompts[member.row.item], member.row.intervention
                history = member.tokens
                ids = torch.tensor([prompt.ids + history[:-1]])
                reference = DynamicCache()
                interventions_m = batch_interventions(prompt, row, L)
                forward(lm.model, ids, cache=reference, interventions=interventions_m)
                group = decode.groups[member.group]
                visible = torch.cat(
                    [decode.layout.mask[member.query], torch.tensor(group.columns, dtype=torch.long)]
                ).bool()
                holes_seen += int((torch.tensor(group.columns) == 0).sum()) if group.columns else 0
                # columns hidden from layer j on are never read there: their states may differ (shared context)
                hidden_cols = torch.zeros(ids.shape[1], dtype=torch.bool)
                for a, b in prompt.hidden:
                    hidden_cols[a:b] = True
                for layer in range(L):
                    read = ~hidden_cols if layer >= row.layer else torch.ones_like(hidden_cols)
                    slot = decode.keys[layer].index(decode.slot_key(m, layer))
                    cached = decode.cache.layers[layer]
                    for ours, theirs in (
                        (cached.keys[slot][:, visible], reference.layers[layer].keys[0]),
                        (cached.values[slot][:, visible], reference.layers[layer].values[0]),
                    ):
                        torch.testing.assert_close(ours[:, read], theirs[:, read], atol=1e-5, rtol=1e-5)
                accepted = len(history) - before[m]
                expected = last_hidden(lm.model, ids, interventions=interventions_m)[0, -1]
                torch.testing.assert_close(hidden[leaves[m], accepted - 1], expected, atol=1e-5, rtol=1e-5)
            checked_steps += 1
            splits_seen = engine.stats["splits"]
    assert checked_steps >= 3 and splits_seen > 0
    if wrong_at is not None:
        assert holes_seen > 0 and engine.stats["draft_tokens"] > engine.stats["draft_accepted"]


def test_slots_that_leave_are_filled_from_the_end_and_new_slots_copy_kept_ones():
    """Row i takes old row keep[i] (a moved row comes from past the kept count), copies are appended (the
    buffer grows when full), only the filled columns count; an order that would overwrite a row still to
    move is refused."""
    rows, width, length = 5, 6, 4
    keys = torch.arange(rows, dtype=torch.float32)[:, None, None, None].expand(rows, 1, width, 2).contiguous()
    layer = SlotLayer(keys, keys + 100, length)  # row r holds r (keys) and 100 + r (values)
    layer.rearrange([0, 4, 2], [1, 0, 1])  # rows 1 and 3 left; row 4 fills row 1's place
    assert layer.keys.shape == (6, 1, length, 2) and layer.values.shape == (6, 1, length, 2)
    assert layer.keys[:, 0, :, 0].tolist() == [[r] * length for r in (0, 4, 2, 4, 0, 4)]
    assert layer.values[:, 0, 0, 0].tolist() == [100 + r for r in (0, 4, 2, 4, 0, 4)]
    with pytest.raises(ValueError, match="moves only from"):
        layer.rearrange([1, 0], [])
    with pytest.raises(TypeError, match="rearranged"):
        layer.batch_select_indices(torch.tensor([0]))


def test_a_buffer_with_room_fills_it_before_it_grows():
    keys = torch.arange(5, dtype=torch.float32)[:, None, None, None].expand(5, 1, 3, 1).contiguous()
    layer = SlotLayer(keys, keys, 2, rows=3)  # rows 3 and 4: room
    assert layer.keys.shape[0] == 3
    layer.rearrange([0, 1, 2], [2, 0])  # into the room: the same buffer
    assert layer.buf_k.shape[0] == 5 and layer.keys[:, 0, 0, 0].tolist() == [0, 1, 2, 2, 0]
    layer.rearrange([0, 1, 2, 3, 4], [1])  # full: grows
    assert layer.buf_k.shape[0] >= 6 and layer.keys[:, 0, 1, 0].tolist() == [0, 1, 2, 2, 0, 1]
    with pytest.raises(ValueError, match="slots in a buffer"):
        SlotLayer(keys, keys, 2, rows=6)


@pytest.mark.parametrize("kept", [[0, 1, 2], [4, 0, 2], [1, 3, 5, 6], [7], [], [0, 2, 9, 10, 11]])
def test_the_hole_filling_order_keeps_every_kept_slot_and_moves_only_into_holes(kept):
    order = hole_filling_order(set(kept))
    assert sorted(order) == sorted(kept)
    assert all(old == new or (old >= len(kept) and new not in kept) for new, old in enumerate(order))


def queries_of(rows: list[int]) -> list[list[str]]:
    """Queries of the given row counts, their rows named query:row."""
    return [[f"{q}:{r}" for r in range(n)] for q, n in enumerate(rows)]


@pytest.mark.parametrize(
    "rows, per_batch, batches",
    [
        ([19] * 8, 6, [4, 4]),  # spread evenly: not 6 + 2
        ([19] * 8, 3, [3, 3, 2]),
        ([19] * 16, 6, [6, 5, 5]),
        ([19] * 5, 4, [3, 2]),
        ([19] * 3, 8, [3]),
        ([], 3, []),
    ],
)
def test_query_batches_are_whole_queries_spread_evenly(rows, per_batch, batches):
    queries = queries_of(rows)
    packed = list(query_batches(queries, per_batch))
    assert [len(b) // 19 for b in packed] == batches
    assert [row for b in packed for row in b] == [row for q in queries for row in q]  # each once, in order


def test_a_query_holds_a_slot_per_diverged_row_and_one_shared():
    lm = tiny("llama")
    n = lm.info.num_layers
    engine = TreeEngine(lm.model, lm.tokenizer)
    prompts = masked(encoded_prompts(lm.tokenizer)[:1], get_condition("examples"))
    sweep = engine.plan(prompts, [MaskFrom(j) for j in range(n + 1)])
    assert query_states(sweep, n) == pytest.approx((n + 3) / 2)  # layer l: l + 1 diverged rows and the shared slot
    assert query_states(engine.plan(prompts, [UNCHANGED, UNCHANGED]), n) == 1  # nothing diverges: one slot
    assert query_states(engine.plan(prompts, [MaskFrom(0), MaskFrom(0)]), n) == 2  # both diverge at once


@pytest.mark.parametrize(
    "rule, memory, batch_size, per_batch, whole",
    [
        (4, 1000, None, 2, True),  # two queries' states (2 x 1.75) fit 4: six rows a batch
        (4, 4, None, 1, True),  # unshared, two queries' rows (6) would pass the KV-memory bound
        (1, 1000, None, None, False),  # one query's states (1.75) pass the rule: its rows are split
        (None, 1000, 6, 2, True),  # --batch-size counts rows
        (None, 1000, 2, None, False),
    ],
)
def test_automatic_batches_count_states_and_forced_ones_rows(monkeypatch, rule, memory, batch_size, per_batch, whole):
    lm = tiny("llama")
    assert lm.info.num_layers == 4  # each query: 3 rows diverging at 2, 3, 4: 1, 1, 2, 3 slots a layer
    packed = []
    real = tree.query_batches
    monkeypatch.setattr(tree, "query_batches", lambda q, per: packed.append((len(q), per)) or real(q, per))
    monkeypatch.setattr(fast, "rule_rows", lambda *args, **kwargs: rule)
    monkeypatch.setattr(tree, "rows_by_memory", lambda *args, **kwargs: memory)
    encs, condition = encoded_prompts(lm.tokenizer), get_condition("examples")
    rows = [MaskFrom(j) for j in (2, 3, 4)]
    assert_tree_equals(lm, encs, condition, rows, batch_size=batch_size, check_reference=False)
    ((queries, got),) = packed
    assert queries == (len(encs) if whole else 0)
    if whole:
        assert got == per_batch
