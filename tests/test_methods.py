"""Task vectors, function vectors and the logit lens (experiments/methods.py, engines/readout.py).

Patch rows decode the same on the reference and fast engines as under plain hooks written here; the
readings equal the model's own states and logits; the per-head indirect effects equal full forwards;
the method units are planned, stored, resumed and drawn."""

from __future__ import annotations

import copy
import types

import pytest
import torch

from conftest import OUT_PROJ, tiny, tiny_worker
from icl_locate.core.conditions import MaskedPrompt, get_condition
from icl_locate.core.interventions import UNCHANGED, AblateLayers, ColumnMask, MaskFrom, intervene
from icl_locate.core.patches import PatchLastPosition, ReplaceHeadOutput
from icl_locate.core.prompts import FORMATS, Example, answer_first_token, build_prompt, encode_prompt
from icl_locate.core.structure import decoder_layers, final_norm
from icl_locate.engines import base as base_module
from icl_locate.engines import fast as fast_module
from icl_locate.engines import indirect, readout
from icl_locate.engines.base import Generation, StopRule, forward
from icl_locate.engines.fast import FastEngine
from icl_locate.engines.indirect import head_indirect_effects, head_patch_bands, head_sites
from icl_locate.engines.readout import (
    check_head_logits,
    function_vector,
    head_logits,
    last_position_states,
    lens_states,
    logit_lens,
    mean_head_outputs,
)
from icl_locate.engines.reference import ReferenceEngine, batch_interventions, greedy_decode
from icl_locate.engines.rows import plan_rows
from icl_locate.engines.tree import TreeEngine
from icl_locate.experiments import units
from icl_locate.experiments.planning import default_top_heads, plan_units
from icl_locate.experiments.settings import SweepConfig
from icl_locate.experiments.unchanged import UnchangedGenerations, UnmaskedReadings
from icl_locate.util.errors import UserError

FAMILIES = ["llama", "gemma3", "qwen2", "gpt_neo", "bloom", "starcoder2"]
BANK = [Example(str(i), f"phrase numero {i} ici", f"phrase number {i} here") for i in range(4)]
QUERIES = ["une question", "une autre question un peu plus longue", "court"]
STOP = StopRule((), 5)


def prompts(tokenizer) -> list[MaskedPrompt]:
    """Three prompts of different lengths (the engines left-pad them in one batch)."""
    fmt = FORMATS["instr_machine_translation"]
    return [
        MaskedPrompt.of(encode_prompt(tokenizer, build_prompt(fmt, BANK[:3], q, header="Translate:")), None)
        for q in QUERIES
    ]


def hidden_size(lm) -> int:
    return lm.model.config.hidden_size


def plain_patched_decode(lm, ids, layer: int, edit):
    """Greedy decoding with ``edit`` applied by a plain pre-hook to decoder layer ``layer``'s input at the
    prompt's last position, in the prompt's forward only (later tokens read its cached keys/values)."""

    def hook(module, args, kwargs):
        x = args[0] if args else kwargs["hidden_states"]
        if x.shape[1] == len(ids):
            x = x.clone()
            x[:, -1] = edit(x[:, -1])
        return ((x,) + tuple(args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": x})

    handle = decoder_layers(lm.model)[layer].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        return greedy_decode(lm.model, lm.tokenizer, ids, (), STOP)
    finally:
        handle.remove()


def test_rows_that_only_patch_share_every_column_before_the_patch():
    lm = tiny("llama")
    ps = prompts(lm.tokenizer)
    n = lm.info.num_layers
    patch = PatchLastPosition(1, "add", torch.ones(hidden_size(lm)))
    for row in plan_rows(ps, [patch, UNCHANGED], n):  # the prefix cache runs up to the patched last token
        assert (list(row.prefix_key[0]), row.query_ids, row.prefix_key[1]) == (
            ps[row.item].ids[:-1],
            ps[row.item].ids[-1:],
            None,
        )
    masked_ps = [MaskedPrompt.of(p.encoded, get_condition("instructions+examples")) for p in ps]
    for row in plan_rows(masked_ps, [patch, MaskFrom(2)], n):  # a mask hides context: split at the query
        assert len(row.prefix_key[0]) == masked_ps[row.item].query_start()


def test_a_model_whose_logits_are_not_its_head_on_its_final_state_is_refused():
    lm = tiny("gemma3")  # softcapped: accepted
    check_head_logits(lm.model, "--method logit-lens")

    def logit_scale(module, args, out) -> None:
        out.logits.mul_(0.5)

    scale = lm.model.register_forward_hook(logit_scale)
    try:
        with pytest.raises(UserError, match="--method logit-lens reads the LM head on hidden states"):
            check_head_logits(lm.model, "--method logit-lens")
    finally:
        scale.remove()


@pytest.mark.parametrize("family", ["llama", "gemma3", "gpt_neo", "bloom", "gpt2"])
def test_prefix_caches_made_together_equal_one_forward_each(family, monkeypatch):
    """The prefixes of patch rows (each prompt but its last token) run right-padded in one forward."""
    lm = tiny(family)
    ps = prompts(lm.tokenizer)
    engine = FastEngine(lm.model, lm.tokenizer)
    rows = engine.plan(ps, [PatchLastPosition(1, "add", torch.ones(hidden_size(lm)))])
    together, alone = engine.prefix_caches(rows), engine.prefix_caches(rows)
    together.prepare(rows)
    assert len(together.caches) == len(ps) and not alone.caches
    prefixes = [r.prefix_key[0] for r in rows]
    shared = base_module.common_start(prefixes)  # BOS, the instructions, the examples: run once
    assert shared >= len(ps[0].ids) // 2
    assert engine.stats["prefix_tokens"] == shared + sum(len(p) - shared for p in prefixes)
    in_pairs = engine.prefix_caches(rows)  # a token budget that holds two of them a forward
    monkeypatch.setattr(fast_module, "PREFIX_BATCH_TOKENS", 2 * max(len(r.prefix_key[0]) for r in rows))
    in_pairs.prepare(rows)
    for row in rows:
        for (k1, _), (k2, _) in zip(in_pairs.get(row), together.get(row), strict=True):
            torch.testing.assert_close(k1, k2, rtol=1e-5, atol=1e-5)
        for (k1, v1), (k2, v2) in zip(together.get(row), alone.get(row), strict=True):
            assert k1.shape == k2.shape == (1, k2.shape[1], len(row.prefix_key[0]), k2.shape[3])
            torch.testing.assert_close(k1, k2, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(v1, v2, rtol=1e-5, atol=1e-5)


def test_the_shared_length_of_prefixes_leaves_each_a_token_of_its_own():
    assert base_module.common_start([[1, 2, 3, 4], [1, 2, 5], [1, 2, 3]]) == 2
    assert base_module.common_start([[1, 2, 3], [1, 2, 3]]) == 2
    assert base_module.common_start([[1, 2], [3, 2]]) == 0
    assert base_module.common_start([[7], [7, 8]]) == 0
    assert base_module.common_start([[1, 2, 3]]) == 0  # one prefix runs whole


@pytest.mark.parametrize("split", ["at the patch", "at the query"])
@pytest.mark.parametrize("family", FAMILIES)
def test_patch_rows_decode_as_plain_hooks_on_the_reference_and_fast_engines(family, split):
    lm = tiny(family)
    ps = prompts(lm.tokenizer)
    g = torch.Generator().manual_seed(0)
    per_prompt = 3 * torch.randn(len(ps), hidden_size(lm), generator=g)
    shared = 3 * torch.randn(hidden_size(lm), generator=g)
    rows = [PatchLastPosition(1, "replace", per_prompt), PatchLastPosition(2, "add", shared), UNCHANGED]
    # beside a row that does more than patch, the prompts split at the query: the patched last tokens are
    # fed with the rest of the query, the shorter prompts left-padded beside the longest
    run = rows + ([AblateLayers(frozenset({1}))] if split == "at the query" else [])
    reference = ReferenceEngine(lm.model, lm.tokenizer).generate(ps, run, STOP)
    # one batch, batches of two rows, the tree engine
    fast = [FastEngine(lm.model, lm.tokenizer, batch_size=size).generate(ps, run, STOP) for size in (None, 2)]
    fast.append(TreeEngine(lm.model, lm.tokenizer, head_kind="plain", draft_tokens=0).generate(ps, run, STOP))
    fast.append(TreeEngine(lm.model, lm.tokenizer, head_kind="plain", draft_tokens=3).generate(ps, run, STOP))
    for i, p in enumerate(ps):
        plain = [
            plain_patched_decode(lm, p.ids, 1, lambda x, i=i: per_prompt[i].to(x.dtype).expand_as(x)),
            plain_patched_decode(lm, p.ids, 2, lambda x: x + shared.to(x.dtype)),
            greedy_decode(lm.model, lm.tokenizer, p.ids, (), STOP),
        ]
        for row, want in zip(rows, plain, strict=True):
            assert reference[(i, row)].token_ids == want.token_ids, (family, i, row)
            assert [f[(i, row)].token_ids for f in fast] == [want.token_ids] * len(fast), (family, i, row)
    assert any(reference[(i, rows[0])].token_ids != reference[(i, UNCHANGED)].token_ids for i in range(len(ps)))


@pytest.mark.parametrize("family", ["llama", "gpt_neo"])
def test_a_models_own_state_or_a_zero_vector_changes_nothing(family):
    lm = tiny(family)
    ps = prompts(lm.tokenizer)
    layers = list(range(lm.info.num_layers))
    states = last_position_states(lm.model, [p.ids for p in ps], layers)  # [prompts, layers, d]
    rows = [PatchLastPosition(layer, "replace", states[:, layer]) for layer in layers]
    rows += [PatchLastPosition(1, "add", torch.zeros(hidden_size(lm))), UNCHANGED]
    got = FastEngine(lm.model, lm.tokenizer).generate(ps, rows, StopRule((), 4))
    for i in range(len(ps)):
        assert {tuple(got[(i, row)].token_ids) for row in rows} == {tuple(got[(i, UNCHANGED)].token_ids)}


def test_last_position_states_are_the_models_hidden_states():
    lm = tiny("llama")
    ids = prompts(lm.tokenizer)[0].ids
    out = lm.model(torch.tensor([ids]), output_hidden_states=True)
    states = last_position_states(lm.model, [ids], [0, 1, 2])
    for layer in (0, 1, 2):
        torch.testing.assert_close(states[0, layer], out.hidden_states[layer][0, -1], rtol=0, atol=0)


@pytest.mark.parametrize("family", ["llama", "gemma3", "gpt_neo"])
def test_readings_that_run_the_shared_context_once_equal_full_forwards(family):
    lm = tiny(family)
    n = lm.info.num_layers
    ps = prompts(lm.tokenizer)
    ids, starts = [p.ids for p in ps], [p.query_start() for p in ps]
    close = dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(
        last_position_states(lm.model, ids, range(n), starts), last_position_states(lm.model, ids, range(n)), **close
    )
    means = mean_head_outputs(lm.model, ids, starts)
    torch.testing.assert_close(means, mean_head_outputs(lm.model, ids), **close)


@pytest.mark.parametrize("family", ["llama", "gemma3", "gpt_neo", "bloom"])
def test_lens_states_of_a_right_padded_batch_equal_one_full_forward_each(family):
    lm = tiny(family)
    n = lm.info.num_layers
    ps = prompts(lm.tokenizer)
    starts = [p.query_start() for p in ps]
    for name in (None, "instructions+examples", "instructions"):  # "instructions": examples visible after it
        hidden = [MaskedPrompt.of(p.encoded, get_condition(name) if name else None) for p in ps]
        mask = ColumnMask.from_layer([h.hidden for h in hidden], 0, n) if name else None
        batch = lens_states(lm.model, [p.ids for p in ps], starts, mask)
        for i, h in enumerate(hidden):
            with torch.no_grad(), intervene(lm.model, *(batch_interventions(h, MaskFrom(0), n, i) if name else ())):
                out = lm.model(torch.tensor([h.ids]), output_hidden_states=True)
            want = [out.hidden_states[layer][0, -1] for layer in range(n)]
            torch.testing.assert_close(batch[i, :n], torch.stack(want), rtol=1e-5, atol=1e-5)
            if name is None:  # the last layer's output: what the model's head reads (after its final norm)
                lens_logits = lm.model.get_output_embeddings()(final_norm(lm.model)(batch[i, n]))
                torch.testing.assert_close(lens_logits, out.logits[0, -1], rtol=1e-4, atol=1e-4)


def biased_head_model(softcap: float | None) -> torch.nn.Module:
    """A tiny llama whose LM head has a bias, softcapped by ``softcap``."""
    model = copy.deepcopy(tiny("llama").model)
    head = model.get_output_embeddings()
    model.set_output_embeddings(torch.nn.Linear(head.in_features, head.out_features, bias=True))
    model.config.final_logit_softcapping = softcap
    return model


def small_vocabulary_blocks(monkeypatch, size: int) -> None:
    """``head_readings`` reads blocks of ``size`` tokens, whatever the number of states."""
    monkeypatch.setattr(readout, "VOCAB_BLOCK", size)
    monkeypatch.setattr(readout, "LENS_ROWS", 1)


def plain_logits(model: torch.nn.Module, states: torch.Tensor) -> torch.Tensor:
    """The head module's logits, softcapped as the config says: what the readings must equal."""
    with torch.no_grad():
        logits = model.get_output_embeddings()(states)
    cap = model.config.final_logit_softcapping
    return torch.tanh(logits / cap) * cap if cap else logits


@pytest.mark.parametrize("softcap", [None, 3.0])
def test_head_logits_of_a_vocabulary_block_equal_the_head_module(softcap):
    """Any block of the vocabulary (the last one ragged) and the whole of it give the head's own logits, a bias
    and the softcap included."""
    model = biased_head_model(softcap)
    states = torch.randn(5, model.get_output_embeddings().in_features)
    want = plain_logits(model, states)
    vocab = want.shape[1]
    for first, last in [(0, None), (0, 7), (7, 30), (vocab - 5, vocab), (vocab - 3, vocab + 5)]:
        got = head_logits(model, states, first, last)
        torch.testing.assert_close(got, want[:, first:last], rtol=1e-5, atol=1e-5)


def test_head_readings_block_by_block_equal_the_full_logits(monkeypatch):
    """Rank, top token and probability read a block of the vocabulary at a time equal those of the full logits,
    with exact ties across blocks (the first largest wins; a tie with the answer does not count above it)."""
    small_vocabulary_blocks(monkeypatch, 8)
    torch.manual_seed(0)
    model = biased_head_model(None)
    head = model.get_output_embeddings()
    vocab, hidden = head.out_features, head.in_features
    with torch.no_grad():  # small integers: every logit exact, so twin rows tie exactly whatever the order
        head.weight.copy_(torch.randint(-3, 4, head.weight.shape).float())
        head.bias.zero_()
        head.weight[2] = 3 * torch.randint(0, 2, (hidden,)).float().mul(2).sub(1)  # +-3: the largest norm there is
        head.weight[12] = head.weight[vocab - 3] = head.weight[2]  # twins in a middle and the last (ragged) block
    assert vocab % 8 and vocab - 3 >= vocab // 8 * 8, "token vocab - 3 in a ragged last block"
    states = torch.randint(-2, 3, (6, hidden)).float()
    states[:3] = head.weight[2] * torch.tensor([[1.0], [2.0], [0.5]])  # rows 0-2: the twins' logits are the largest
    logits = plain_logits(model, states)
    answers = torch.tensor([2, vocab - 3, 12, int(logits[3].argmax()), 0, vocab - 1])
    read = readout.head_readings(model, states, answers)
    assert read.rank is not None and read.top is not None
    assert read.top.tolist() == logits.argmax(-1).tolist()
    assert read.top[:3].tolist() == [2, 2, 2]
    assert read.rank.tolist() == ((logits > logits.gather(1, answers[:, None])).sum(-1) + 1).tolist()
    assert read.rank[:4].tolist() == [1, 1, 1, 1]  # tied with the top: nothing above
    torch.testing.assert_close(read.probability, logits.softmax(-1).gather(1, answers[:, None])[:, 0])
    alone = readout.head_readings(model, states, answers, ranks=False)
    assert alone.rank is None and torch.equal(alone.probability, read.probability)


@pytest.mark.parametrize("softcap", [None, 3.0])
def test_head_readings_of_any_head_equal_its_full_logits(monkeypatch, softcap):
    """Blocks or not (an fp32 linear head is read in blocks, any other head whole), with a bias and a softcap:
    the readings of the head's own logits."""
    small_vocabulary_blocks(monkeypatch, 8)
    torch.manual_seed(1)
    model = biased_head_model(softcap)
    states = torch.randn(5, model.get_output_embeddings().in_features)
    logits = plain_logits(model, states)
    answers = torch.tensor([0, 5, 9, int(logits[3].argmax()), logits.shape[1] - 1])
    for blocks in (True, False):
        if not blocks:  # a head that is not a plain linear layer
            model.set_output_embeddings(torch.nn.Sequential(model.get_output_embeddings()))
        read = readout.head_readings(model, states, answers)
        assert read.rank is not None and read.top is not None
        assert read.top.tolist() == logits.argmax(-1).tolist()
        assert read.rank.tolist() == ((logits > logits.gather(1, answers[:, None])).sum(-1) + 1).tolist()
        torch.testing.assert_close(read.probability, logits.softmax(-1).gather(1, answers[:, None])[:, 0])


class HeadOnly(torch.nn.Module):
    """Just an LM head (no softcap): what ``head_readings`` reads of a model."""

    def __init__(self, vocab: int, hidden: int):
        super().__init__()
        self.lm_head = torch.nn.Linear(hidden, vocab, bias=False)
        self.config = types.SimpleNamespace()

    def get_output_embeddings(self) -> torch.nn.Linear:
        return self.lm_head


def test_head_readings_sum_their_blocks_without_adding_up_rounding(monkeypatch):
    """Over 256 blocks a probability stays within a few fp32 units of the float64 one (the blocks' normalisers
    chained in fp32 drift 20 times as far: ~5e-6). Weights and states on a grid of 1/8: every logit exact,
    whatever the product's shape, so only the normaliser is measured."""
    small_vocabulary_blocks(monkeypatch, 256)
    torch.manual_seed(0)
    model = HeadOnly(65536, 16)
    with torch.no_grad():
        model.lm_head.weight.copy_(torch.randn(65536, 16).mul(8).round().div(8))
        logits = model.lm_head(states := torch.randn(8, 16).mul(6).round().div(8))
    answers = logits.argmax(-1)
    want = logits.double().softmax(-1).gather(1, answers[:, None])[:, 0]
    got = readout.head_readings(model, states, answers, ranks=False).probability
    assert float(((got.double() - want) / want).abs().max()) < 1e-6


def test_head_readings_refuse_an_answer_outside_the_vocabulary():
    model = HeadOnly(100, 4)
    with pytest.raises(ValueError, match=r"\[0, 100\)"):
        readout.head_readings(model, torch.randn(2, 4), torch.tensor([3, 100]))


def test_head_patch_bands_start_at_a_layer_change_with_enough_rows(monkeypatch):
    monkeypatch.setattr(indirect, "BAND_ROWS", 5)
    sites = head_sites(4, 2)  # None, then (0, 0), (0, 1), (1, 0), ...
    bands = head_patch_bands(sites)
    assert [(first, members) for first, members in bands] == [(0, [0, 1, 2, 3, 4]), (2, [5, 6, 7, 8])]
    for first, members in bands:  # no row of a band is patched below the band's first layer
        assert all(sites[i] is None or sites[i][0] >= first for i in members)
    with pytest.raises(ValueError, match="by layer"):
        head_patch_bands([(1, 0), None])
    with pytest.raises(ValueError, match="by layer"):
        head_patch_bands([None, (2, 0), (1, 0)])


def answer_probability(lm, ids, answer, patches=()) -> float:
    logits = forward(lm.model, torch.tensor([ids]), interventions=patches, last_only=True).logits[0, -1]
    return float(logits.float().softmax(-1)[answer])


@pytest.mark.parametrize("band_rows", [1, 10**6])  # a band per layer (layers below skipped); one band
@pytest.mark.parametrize("family", ["llama", "gemma3", "gpt_neo", "bloom", "qwen2", "starcoder2", "gpt2", "mistral"])
def test_indirect_effects_equal_full_forwards_with_the_head_patched(family, band_rows, monkeypatch):
    """Four prompts of three lengths: three run together (their caches made in one forward, the shorter
    ones left-padded), then the fourth alone; every band in several forwards."""
    monkeypatch.setattr(indirect, "BAND_ROWS", band_rows)
    monkeypatch.setattr(indirect, "ROWS_PER_FORWARD", 5)
    monkeypatch.setattr(indirect, "PROMPTS_PER_BATCH", 3)
    lm = tiny(family)
    ids = [p.ids for p in prompts(lm.tokenizer)]
    means = mean_head_outputs(lm.model, ids[:2])  # [L, H, head_dim]
    corrupted, answers = [ids[1], ids[2], ids[0], ids[2]], [7, 3, 11, 5]
    assert len({len(x) for x in corrupted}) == 3
    effects = head_indirect_effects(lm.model, corrupted, answers, means)  # [prompts, L, H]
    for p, (x, answer) in enumerate(zip(corrupted, answers, strict=True)):
        base = answer_probability(lm, x, answer)
        for layer, head in [(0, 0), (1, 3), (lm.info.num_layers - 1, 2)]:
            patch = ReplaceHeadOutput(layer, head, len(x) - 1, means[layer, head])
            want = answer_probability(lm, x, answer, [patch]) - base
            assert abs(float(effects[p, layer, head]) - want) < 1e-5, (family, p, layer, head)
    own = mean_head_outputs(lm.model, ids[2:])  # the prompt's own head outputs: no effect anywhere
    assert float(head_indirect_effects(lm.model, ids[2:], [answers[0]], own).abs().max()) < 1e-5


def test_indirect_effects_fit_their_cache_copies_in_the_memory_bound(monkeypatch):
    """A bound that holds one row's cache copy runs one prompt and one row a forward: the same effects."""
    lm = tiny("llama")
    ids = [p.ids for p in prompts(lm.tokenizer)]
    means = mean_head_outputs(lm.model, ids[:2])
    want = head_indirect_effects(lm.model, ids, [7, 3, 11], means)
    assert indirect.batch_sizes(10, 3) == (3, indirect.ROWS_PER_FORWARD)
    monkeypatch.setattr(indirect, "KV_BYTES_PER_FORWARD", 100)
    assert indirect.batch_sizes(60, 3) == (1, 1)
    assert indirect.batch_sizes(40, 3) == (2, 2)
    rows_fed: list[int] = []

    def counted(model, input_ids, *args, **kwargs):
        rows_fed.append(input_ids.shape[0])
        return base_module.last_hidden(model, input_ids, *args, **kwargs)

    monkeypatch.setattr(indirect, "last_hidden", counted)
    torch.testing.assert_close(head_indirect_effects(lm.model, ids, [7, 3, 11], means), want, rtol=0, atol=1e-6)
    assert rows_fed and max(rows_fed) == 1


def test_indirect_effects_refuse_mismatched_answers_and_one_token_prompts():
    lm = tiny("llama")
    ids = [p.ids for p in prompts(lm.tokenizer)]
    means = mean_head_outputs(lm.model, ids[:2])
    with pytest.raises(ValueError, match="answers"):
        head_indirect_effects(lm.model, ids, [7, 3], means)
    with pytest.raises(ValueError, match="a token before its last"):
        head_indirect_effects(lm.model, [ids[0], ids[0][:1]], [7, 3], means)


@pytest.mark.parametrize("family", ["llama", "gpt_neo"])
def test_the_function_vector_is_the_heads_means_through_the_output_projection(family):
    lm = tiny(family)
    means = mean_head_outputs(lm.model, [p.ids for p in prompts(lm.tokenizer)])
    heads = [(0, 1), (2, 3)]
    weight = {
        layer: decoder_layers(lm.model)[layer].get_submodule(OUT_PROJ[family]).weight.float() for layer, _ in heads
    }
    d = means.shape[-1]
    want = sum(weight[layer][:, h * d : (h + 1) * d] @ means[layer, h] for layer, h in heads)
    torch.testing.assert_close(function_vector(lm.model, means, heads), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ["llama", "gemma3", "gpt_neo"])
def test_the_lens_is_the_models_own_output_at_the_last_layer(family):
    lm = tiny(family)
    ids = prompts(lm.tokenizer)[1].ids
    n = lm.info.num_layers
    with torch.no_grad():
        out = lm.model(torch.tensor([ids]), output_hidden_states=True)
    logits = out.logits[0, -1].float()
    answer = int(logits.topk(3).indices[2])  # the third most likely token: rank 3 at the last layer
    stats, top = logit_lens(lm.model, ids, answer)  # [L+1, 3]
    assert stats.shape == (n + 1, 3) and top[n] == int(logits.argmax())
    assert stats[n, 2] == 3 and stats[n, 0] == 0
    assert abs(float(stats[n, 1]) - float(logits.softmax(-1)[answer])) < 1e-5
    head, norm = lm.model.get_output_embeddings(), final_norm(lm.model)
    with torch.no_grad():
        lens_1 = head(norm(out.hidden_states[1][0, -1])).float()
    cap = getattr(lm.model.config, "final_logit_softcapping", None)
    if cap:
        lens_1 = torch.tanh(lens_1 / cap) * cap
    assert abs(float(stats[1, 1]) - float(lens_1.softmax(-1)[answer])) < 1e-5
    assert top[1] == int(lens_1.argmax())


def test_the_answers_first_token_continues_the_prompt():
    tokenizer = tiny("llama").tokenizer
    enc = encode_prompt(tokenizer, build_prompt(FORMATS["instr_machine_translation"], BANK[:2], "court"))
    first = answer_first_token(tokenizer, enc, " short answer ")
    full = tokenizer(enc.text + "short answer")["input_ids"]
    assert full[: len(enc.ids)] == enc.ids and first == full[len(enc.ids)]
    with pytest.raises(ValueError, match="empty answer"):
        answer_first_token(tokenizer, enc, "  ")


def test_default_top_heads_keeps_todd_et_al_share():
    assert default_top_heads(28, 16) == 10  # GPT-J, as in the paper
    assert default_top_heads(32, 32) == 23  # Llama-7B
    assert default_top_heads(18, 4) == 3  # Gemma-3-270M: at least three


def test_method_units_plan_and_bad_combinations_fail_in_one_line():
    lens = plan_units(SweepConfig(method="logit-lens", conditions=["instructions+examples", "examples"]), 4)
    assert [(u.kind, u.condition, u.layers) for u in lens] == [
        ("logit-lens", "instructions+examples", (0, 1, 2, 3, 4)),
        ("logit-lens", "examples", (0, 1, 2, 3, 4)),
    ]
    (fv,) = plan_units(SweepConfig(method="function-vector"), 4, num_heads=16)
    assert (fv.kind, fv.condition, fv.layers, fv.top_heads) == ("function-vector", "", (0, 1, 2, 3), 3)
    (mask,) = plan_units(SweepConfig(), 4)
    assert mask.unit_id == plan_units(SweepConfig(top_heads=None), 4)[0].unit_id and "top_heads" not in str(
        mask.unit_id
    )
    bad = [
        (dict(method="nope"), "--method must be one of"),
        (dict(method="logit-lens", top_heads=4), "--top-heads is for --method function-vector"),
        (dict(method="function-vector", ks=[1]), "--k >= 2"),
        (dict(method="task-vector", heads="knockout"), "runs alone"),
        (dict(method="task-vector", n_test=1), "--n-test >= 2"),
    ]
    for settings, message in bad:
        with pytest.raises(UserError, match=message):
            plan_units(SweepConfig(**settings), 4, num_heads=4)


def test_a_vector_unit_takes_the_icl_baseline_from_the_masking_unit_of_its_worker(data_dir):
    """The worker keeps the masking unit's unmasked rows; the task-vector unit after it stores them as
    its ICL baseline without decoding them, and they equal what a fresh worker decodes."""
    settings = dict(model="tiny:llama", pairs=["fra-eng"], seeds=[0], ks=[2], n_test=3, max_new_tokens=4)
    config = SweepConfig(conditions=["instructions+examples"], data_dir=str(data_dir), **settings)
    vector = SweepConfig(method="task-vector", data_dir=str(data_dir), **settings)
    worker = tiny_worker(config, fast_engine=True, max_new_tokens=4)
    (mask_unit,) = plan_units(config, worker.loaded.info.num_layers)
    (vector_unit,) = plan_units(vector, worker.loaded.info.num_layers)
    n_layers = worker.loaded.info.num_layers

    def generations(result, variant, layer):
        rows = [p for p in result.predictions if p["variant"] == variant and p["layer"] == layer]
        return [p["raw_generation"] for p in sorted(rows, key=lambda p: p["item"])]

    masked = worker.compute(mask_unit)
    reused = worker.compute(vector_unit)
    assert worker.unchanged.reused == 3  # every ICL prompt taken from the masking unit
    fresh_worker = tiny_worker(config, fast_engine=True, max_new_tokens=4)
    fresh = fresh_worker.compute(vector_unit)
    assert fresh_worker.unchanged.reused == 0
    want = generations(masked, "mask", n_layers)
    assert generations(reused, "icl", n_layers) == want == generations(fresh, "icl", n_layers)
    assert sorted(reused.scores) == sorted(fresh.scores)


def test_the_vector_and_lens_units_of_a_worker_read_the_icl_prompts_once(data_dir):
    """Task vector, function vector, lens over two cells (seeds), each method over both cells before the
    next, as an atlas runs them: one worker reads each cell's ICL prompts once, the later units take the
    readings kept, and each unit stores what a fresh worker stores (readings, decoded rows, scores)."""
    settings = dict(model="tiny:llama", pairs=["fra-eng"], seeds=[0, 1], ks=[2], n_test=3, max_new_tokens=4)
    methods = ["task-vector", "function-vector", "logit-lens"]
    configs = [SweepConfig(method=m, data_dir=str(data_dir), **settings) for m in methods]
    worker = tiny_worker(configs[0], fast_engine=True, max_new_tokens=4)
    n_layers, n_heads = worker.loaded.info.num_layers, worker.loaded.info.num_heads
    units = [(config, unit) for config in configs for unit in plan_units(config, n_layers, num_heads=n_heads)]
    assert len(units) == 6
    together = [worker.compute(unit) for _, unit in units]
    assert worker.readings.reused == 4
    for (config, unit), result in zip(units, together, strict=True):
        fresh_worker = tiny_worker(config, fast_engine=True, max_new_tokens=4)
        fresh = fresh_worker.compute(unit)
        assert fresh_worker.readings.reused == 0
        key = lambda p: (p["variant"], p["layer"], p["item"])  # noqa: E731
        assert [(key(p), p["raw_generation"], p["stats"]) for p in sorted(result.predictions, key=key)] == [
            (key(p), p["raw_generation"], p["stats"]) for p in sorted(fresh.predictions, key=key)
        ], unit.kind
        assert sorted(result.scores) == sorted(fresh.scores), unit.kind


def test_unmasked_readings_are_kept_for_the_same_prompts_only_and_equal_each_reading_alone():
    lm = tiny("llama")
    ps = prompts(lm.tokenizer)
    ids, starts = [p.ids for p in ps], [p.query_start() for p in ps]
    kept = UnmaskedReadings()
    first = kept.read(lm.model, ids, starts)
    assert kept.read(lm.model, ids, starts).hidden is first.hidden and kept.reused == 1  # not read again
    assert kept.read(lm.model, ids, [0] * len(ids)).hidden is not first.hidden  # another shared context
    other = kept.read(lm.model, ids[:2], starts[:2])
    assert other.final is not None and len(other.final) == 2 and kept.reused == 1
    assert kept.read(lm.model, ids, starts).hidden.equal(first.hidden) and kept.reused == 2  # still kept
    kept.KEPT_BYTES = first.nbytes()  # room for one: the least recently used goes
    kept.read(lm.model, ids[1:], starts[1:])
    assert len(kept.kept) == 1 and kept.read(lm.model, ids[1:], starts[1:]) is not None and kept.reused == 3
    n = lm.info.num_layers
    exact = dict(rtol=0, atol=0)
    torch.testing.assert_close(first.hidden, last_position_states(lm.model, ids, range(n), starts), **exact)
    torch.testing.assert_close(first.mean_heads(), mean_head_outputs(lm.model, ids, starts), **exact)
    torch.testing.assert_close(first.lens(), lens_states(lm.model, ids, starts), **exact)


def test_unchanged_generations_are_kept_by_prompt_and_stop_rule_and_not_when_disputed():
    lm = tiny("llama")
    condition = get_condition("instructions+examples")
    ps = [MaskedPrompt.of(p.encoded, condition) for p in prompts(lm.tokenizer)]  # MaskFrom(1) hides something
    n_layers = lm.info.num_layers
    rows = [MaskFrom(n_layers), MaskFrom(1), PatchLastPosition(1, "add", torch.zeros(hidden_size(lm)))]
    gens = {(i, row): Generation([i], f"g{i}", "stop") for i in range(len(ps)) for row in rows}
    kept = UnchangedGenerations()
    kept.keep(ps, rows, gens, STOP, n_layers, disputed={(1, rows[0])})
    assert kept.find(ps[:1], STOP) == [gens[(0, rows[0])]]  # the unmasked row, nothing else
    assert kept.find(ps[:2], STOP) is None  # prompt 1's was disputed by an audit
    assert kept.find(ps[:1], StopRule((), 6)) is None  # another stop rule decodes differently
    assert kept.find(ps[2:], STOP) == [gens[(2, rows[0])]] and kept.reused == 2


def test_a_units_seconds_leave_out_the_engines_calibration(data_dir, monkeypatch):
    """Masking and method units alike: measuring the engine is its own cost (stated on its own line and in the
    run record), not the unit's, so that the units' seconds compare."""
    settings = dict(model="tiny:llama", pairs=["fra-eng"], seeds=[0], ks=[2], n_test=3, max_new_tokens=4)
    config = SweepConfig(conditions=["instructions+examples"], data_dir=str(data_dir), **settings)
    worker = tiny_worker(config, fast_engine=True, max_new_tokens=4)
    n_layers = worker.loaded.info.num_layers
    unit_list = plan_units(config, n_layers)
    for method in ("task-vector", "function-vector"):
        method_config = SweepConfig(method=method, data_dir=str(data_dir), **settings)
        unit_list += plan_units(method_config, n_layers, num_heads=worker.loaded.info.num_heads)
    clock, real_time, engine_for = [0.0], units.time.time, units.Worker.engine_for

    def calibrating_for_an_hour(self, *args):
        clock[0] += 3600.0
        return engine_for(self, *args)

    monkeypatch.setattr(units, "time", type("Clock", (), {"time": staticmethod(lambda: real_time() + clock[0])}))
    monkeypatch.setattr(units.Worker, "engine_for", calibrating_for_an_hour)
    for unit in unit_list:
        before = clock[0]
        assert worker.compute(unit).seconds < 3600, unit.kind
        assert clock[0] > before, unit.kind  # it did ask for its engine
