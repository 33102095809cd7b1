"""The calibration measures, then chooses: it picks the faster measured choice, honours every forcing
flag, caches per key (a changed key measures again), and every choice decodes the same tokens as
the reference engine. The chosen path and the machine are stored with the run and the bench."""

from __future__ import annotations

import gc
import json
import math
import sqlite3
import weakref
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from conftest import tiny
from icl_locate.cli import main
from icl_locate.core.conditions import get_condition
from icl_locate.core.interventions import MaskFrom
from icl_locate.core.models import load_model
from icl_locate.engines import batch_rows, calibrate, calibration_cache, draft_timing, fast, head_timing, timing
from icl_locate.engines import tree as tree_engine
from icl_locate.engines.base import StopRule, forward, last_hidden
from icl_locate.engines.calibrate import TREE_BATCH_NOTE, Calibrator, build_engine
from icl_locate.engines.choices import Choices
from icl_locate.engines.fast import FastEngine
from icl_locate.engines.head import CertifiedHead
from icl_locate.engines.reference import ReferenceEngine
from icl_locate.engines.request import AUTO_REQUEST, EngineRequest, parse_draft_tokens
from icl_locate.engines.screens import SCREENS, build_screen, forget_kept_screens, keep_screen, kept_screen
from icl_locate.engines.timing import measure_seconds
from icl_locate.engines.tree import TreeEngine
from icl_locate.util.errors import UserError
from test_fast_engine import FAMILIES, encoded_prompts, masked
from test_screened_heads import KINDS, head_model, with_outlier_channels

STOP = StopRule((), 6)


class FakeTimer:
    """Runs each measured function once and returns the seconds given for its name; a head's check on the
    whole sample ("check/KIND", "gate/plain": the same call as its round) not named takes the head's seconds;
    a head not named: 10 s (out at its first timing); anything else: 1 s. Records what was measured."""

    def __init__(self, **seconds: float):
        self.seconds = {name.replace("__", "/").replace("_plus_", "+"): s for name, s in seconds.items()}
        self.calls: list[str] = []

    def __call__(self, name, fn):
        fn()
        self.calls.append(name)
        return self.seconds.get(name, self.seconds.get(round_name(name), 10.0 if is_head(name) else 1.0))


def round_name(name: str) -> str:
    """The name of a head's rounds ("head/KIND") for its timed check ("check/KIND", "gate/plain"), else ``name``."""
    return "head/plain" if name == "gate/plain" else name.replace("check/", "head/", 1)


def is_head(name: str) -> bool:
    return round_name(name).startswith("head/")


def head_timings(timer: FakeTimer, kind: str) -> int:
    """How often ``kind``'s head was timed on the whole sample: its check (the first round) and its rounds."""
    return sum(round_name(name) == f"head/{kind}" for name in timer.calls)


def timed_heads(timer: FakeTimer) -> set[str]:
    """The heads timed on the whole sample (in their checks or rounds), by kind."""
    return {round_name(name)[5:] for name in timer.calls if round_name(name).startswith("head/")}


def int8_sizes(screen, hidden, sizes: list[int]) -> None:
    """Note the rows of an int8 screen's call (not of its subclass int8-linear, which inherits the method)."""
    if screen.kind == "int8":
        sizes.append(len(hidden))


def work(lm):
    prompts = masked(encoded_prompts(lm.tokenizer), get_condition("instructions+examples"))
    return prompts, [MaskFrom(j) for j in range(lm.info.num_layers + 1)]


def choose(lm, tmp_path, timer, request=AUTO_REQUEST, use_cache=True):
    prompts, rows = work(lm)
    return Calibrator(lm.model, lm.tokenizer, request, cache=tmp_path / "cal", timer=timer, use_cache=use_cache).choose(
        prompts, rows, STOP
    )


R = timing.REPEATS


@pytest.mark.parametrize(
    "plain, bf16, int8, expected, rounds",
    [
        # the timings of each on the whole sample: its timed check, then its rounds
        (1.0, 0.5, 0.7, "bf16", (1, 1, 1)),  # a screen 1.4x faster than the rest in the checks: they decide
        (1.0, 0.7, 0.5, "int8", (1, 1, 1)),
        (0.4, 0.5, 0.6, "plain", (1 + R, 1 + R, 2)),  # 1.25x: every round for the two closest; 1.5x: one round
        (1.0, 0.5, 0.6, "bf16", (2, 1 + R, 1 + R)),  # the plain head out after one round, the screens' near tie
        (0.3, 0.5, 0.6, "plain", (2, 2, 2)),  # the plain head's clear win in the checks decides nothing: one round
    ],
)
def test_the_fastest_head_is_chosen(tmp_path, plain, bf16, int8, expected, rounds):
    timer = FakeTimer(head__plain=plain, head__bf16=bf16, head__int8=int8, engine__fast=2.0, engine__tree=1.0)
    choices = choose(tiny("llama"), tmp_path, timer)
    assert choices.head == expected and choices.engine == "tree"
    assert tuple(head_timings(timer, kind) for kind in ("plain", "bf16", "int8")) == rounds
    assert (choices.measured["head/plain"], choices.measured["head/bf16"], choices.measured["head/int8"]) == (
        plain,
        bf16,
        int8,
    )
    assert ("faster" if expected != "plain" else "slower") in choices.reasons["head"]


def test_the_int8_linear_screen_is_chosen_where_it_is_fastest(tmp_path):
    """The screen whose product runs the quantized linear (AVX2 without VNNI: FBGEMM) is one more timed head."""
    lm = tiny("llama")
    if SCREENS["int8-linear"].unsupported_reason(lm.model) is not None:
        pytest.skip("no exact int8-linear product on this machine")
    linear = {"head__int8-linear": 0.4}
    timer = FakeTimer(head__plain=1.0, head__bf16=0.7, head__int8=0.9, **linear, engine__fast=2.0, engine__tree=1.0)
    choices = choose(lm, tmp_path, timer)
    assert choices.head == "int8-linear" and "int8-linear screen 2.5x faster" in choices.reasons["head"]
    engine = build_engine(lm.model, lm.tokenizer, choices)
    assert isinstance(engine, TreeEngine) and engine.head is not None and engine.head.kind == "int8-linear"


@pytest.mark.parametrize(
    "runs, expected, timed",
    [
        (dict(fast=[2.0], tree=[1.0]), "tree", 1),  # clear: one run each
        (dict(fast=[0.9], tree=[2.0]), "fast", 1),
        (dict(fast=[1.0, 1.0], tree=[1.1, 0.7]), "tree", 2),  # a near tie: each again, the faster run counts
        (dict(fast=[1.1, 0.9], tree=[1.0, 1.0]), "fast", 2),
    ],
)
def test_the_engines_run_again_where_their_mini_runs_nearly_tie(tmp_path, runs, expected, timed):
    class Timer(FakeTimer):
        def __call__(self, name, fn):
            if name.startswith("engine/"):
                self.calls.append(name)
                return runs[name[7:]][self.calls.count(name) - 1]
            return super().__call__(name, fn)

    timer = Timer()
    choices = choose(tiny("llama"), tmp_path, timer)
    assert choices.engine == expected
    assert [timer.calls.count(f"engine/{name}") for name in ("fast", "tree")] == [timed, timed]
    assert (choices.measured["engine/fast"], choices.measured["engine/tree"]) == (min(runs["fast"]), min(runs["tree"]))


def test_the_engines_mini_runs_continue_one_prefix_cache_made_before_them(tmp_path, monkeypatch):
    """Every engine makes the same prefix caches: the comparison takes them, untimed, from the cache of the prompt
    the steps hold (no forward of their own), and each mini-run continues them (it times what differs between
    the engines)."""
    events: list[str] = []
    make = FastEngine._prefix_cache
    monkeypatch.setattr(FastEngine, "_prefix_cache", lambda self, row: events.append("made") or make(self, row))
    read = batch_rows.DecodingSteps.prefix_kv
    monkeypatch.setattr(
        batch_rows.DecodingSteps, "prefix_kv", lambda self, ids: events.append("read") or read(self, ids)
    )

    class Timer(FakeTimer):
        def __call__(self, name, fn):
            if name.startswith("engine/"):
                events.append(f"{name} started")
            return super().__call__(name, fn)

    choices = choose(tiny("llama"), tmp_path, Timer(engine__fast=2.0, engine__tree=1.0))
    assert events == ["read", "engine/fast started", "engine/tree started"]
    assert choices.engine == "tree" and "after their prefix cache" in choices.reasons["engine"]


def test_the_heads_are_timed_on_the_engines_batch_rows_and_kept_per_rows(tmp_path, monkeypatch):
    # the tree engine's batches: whole queries whose states fit the rule's 4: one query of 5 rows (3.5 states)
    monkeypatch.setattr(batch_rows, "rule_rows", lambda *args: 4)
    monkeypatch.setattr(batch_rows, "choose_batch_scale", lambda *args: (1.0, "the rule's rows", {}))  # kept
    sizes: list[int] = []
    argmax = SCREENS["int8"].argmax
    monkeypatch.setattr(
        SCREENS["int8"], "argmax", lambda self, hidden: int8_sizes(self, hidden, sizes) or argmax(self, hidden)
    )
    timer = FakeTimer(head__plain=1.0, head__bf16=0.7, head__int8=0.5, engine__fast=2.0, engine__tree=1.0)
    choices = choose(tiny("llama"), tmp_path, timer)
    assert choices.head == "int8" and "on 5 rows" in choices.reasons["head"]
    # its agreement check, timed: the first round, which decides (1.4x faster than the rest)
    assert sizes[0] == 5 and head_timings(timer, "int8") == 1

    def again(rows: int) -> Choices:
        """The work measured again with the engine's batches at ``rows``, but for the head's verdicts kept."""
        for whole_work in (tmp_path / "cal").glob("[!h]*.json"):
            whole_work.unlink()
        monkeypatch.setattr(batch_rows, "rule_rows", lambda *args: rows)
        return choose(tiny("llama"), tmp_path, timer)

    timer = FakeTimer(head__plain=1.0, head__bf16=0.5, head__int8=0.7, engine__fast=2.0, engine__tree=1.0)
    assert again(6).head == "int8" and not any("head" in c for c in timer.calls)  # one query again: kept
    assert again(12).head == "bf16" and "bf16" in timed_heads(timer)  # three queries, 15 rows: measured again


@pytest.mark.parametrize(
    "costs, expected",
    [
        (dict(step__1=1.0, step__1_plus_2=1.05, step__1_plus_4=1.08, step__1_plus_8=2.0), 4),
        (dict(step__1=1.0, step__1_plus_2=1.05, step__1_plus_4=1.08, step__1_plus_8=1.1), 8),
        (dict(step__1=1.0, step__1_plus_2=1.2, step__1_plus_4=1.0, step__1_plus_8=1.0), 0),  # a CPU's ratio
        (dict(step__1=1.0, step__1_plus_2=2.0, step__1_plus_4=1.0, step__1_plus_8=1.0), 0),
    ],
)
def test_drafts_only_where_a_longer_step_costs_about_one_token(tmp_path, costs, expected):
    timer = FakeTimer(**costs, engine__fast=2.0, engine__tree=1.0)
    choices = choose(tiny("llama"), tmp_path, timer)
    assert choices.draft_tokens == expected
    # a ratio far above the limit is settled by one round; one near it takes every round
    rounds = 1 if timer.seconds["step/1+2"] > draft_timing.DRAFT_COST_CLEAR else timing.REPEATS
    assert timer.calls.count("step/1+2") == rounds


@pytest.mark.parametrize(
    "head, rule, forced, step_rows",
    # 3 queries of 5 rows, 3.5 states each: a rule of 8 takes 2 queries a batch (10 rows), 10,000 all 3 (15)
    [("plain", 8, None, 10), ("int8", 8, None, 10), ("plain", 10_000, None, 15), ("int8", 8, 5, 5)],
)
def test_the_drafts_step_runs_the_chosen_head_at_every_fed_position(
    tmp_path, monkeypatch, head, rule, forced, step_rows
):
    """Verifying a draft of N tokens needs the head at 1 + N positions: the timed step must pay for them, on
    the rows of the tree engine's batches (whole queries whose states fit the rule, or the forced batch size;
    the whole work where it is smaller; here at most the probe's rows)."""
    monkeypatch.setattr(batch_rows, "rule_rows", lambda *args: rule)
    monkeypatch.setattr(batch_rows, "choose_batch_scale", lambda *args: (1.0, "not timed here", {}))
    lm = tiny("llama")
    prompts, rows = work(lm)
    request = EngineRequest(engine="tree", head=head, batch_size=forced)
    calibrator = Calibrator(lm.model, lm.tokenizer, request, cache=tmp_path / "cal")
    lm_head = lm.model.get_output_embeddings()
    head_rows: dict[str, int] = {}

    def timer(name, fn):
        seen: list[int] = []
        screened = calibrator.screens[head].stats["rows"] if head != "plain" else 0
        hook = lm_head.register_forward_hook(lambda module, args, out: seen.append(args[0][..., 0].numel()))
        try:
            fn()
        finally:
            hook.remove()
        if name.startswith("step/"):
            head_rows[name] = sum(seen) if head == "plain" else calibrator.screens[head].stats["rows"] - screened
        return 1.0 if name == "step/1" else 2.0  # drafts never pay: every length is measured once

    calibrator.timer = timer
    calibrator.choose(prompts, rows, STOP)
    assert head_rows == {"step/1": step_rows, "step/1+2": 3 * step_rows}
    assert f"on {step_rows} rows" in calibrator.choose(prompts, rows, STOP).reasons["drafts"]
    if head != "plain":  # the drafts' large logits are not handed to the engine (a forced batch has no batch check)
        assert calibrator.screens[head].buffer is None


def test_the_faster_engine_is_chosen_and_the_fast_engine_takes_the_plain_head(tmp_path):
    choices = choose(
        tiny("llama"),
        tmp_path,
        FakeTimer(head__plain=1.0, head__bf16=0.1, step__1=1.0, step__1_plus_2=1.0, engine__fast=1.0, engine__tree=3.0),
    )
    assert (choices.engine, choices.head, choices.draft_tokens) == ("fast", "plain", 0)
    assert "3.0x faster than the tree engine" in choices.reasons["engine"]
    assert isinstance(build_engine(tiny("llama").model, tiny("llama").tokenizer, choices), FastEngine)


@pytest.mark.parametrize(
    "request_, expected, reason",
    [
        (EngineRequest(head="int8"), ("tree", "int8"), "--head int8 (the tree engine's alone)"),
        (EngineRequest(head="bf16", draft_tokens=2), ("tree", "bf16"), "--head bf16 --draft-tokens 2 (the tree"),
        (EngineRequest(draft_tokens=2), ("tree", None), "--draft-tokens 2 (the tree engine's alone)"),
    ],
)
def test_a_flag_only_the_tree_engine_honours_chooses_it_under_auto(tmp_path, request_, expected, reason):
    """The fast engine would win the comparison, but it has no screened head and no drafts: the flag is kept,
    and the engine follows it without being measured."""
    timer = FakeTimer(
        head__plain=1.0, head__bf16=0.1, head__int8=0.1, step__1=1.0, step__1_plus_2=2.0, engine__fast=1.0,
        engine__tree=3.0,
    )  # fmt: skip
    choices = choose(tiny("llama"), tmp_path, timer, request_)
    assert choices.engine == expected[0] and (expected[1] is None or choices.head == expected[1])
    assert choices.draft_tokens == (request_.draft_tokens or 0)
    assert choices.reasons["engine"].startswith(reason)
    assert not any(name.startswith("engine") for name in timer.calls)


@pytest.mark.parametrize(
    "request_, measured_prefixes, expected",
    [
        (EngineRequest(engine="fast"), {"batch"}, ("fast", "plain", 0)),
        (EngineRequest(engine="fast", batch_size=4), set(), ("fast", "plain", 0)),
        (EngineRequest(engine="tree", head="plain", draft_tokens=3, batch_size=4), set(), ("tree", "plain", 3)),
        (EngineRequest(engine="tree", head="bf16", draft_tokens=0), {"batch"}, ("tree", "bf16", 0)),
        (EngineRequest(engine="tree", head="int8", draft_tokens=0, batch_size=2), set(), ("tree", "int8", 0)),
        (EngineRequest(head="plain", draft_tokens=0), {"engine", "batch"}, None),
        (EngineRequest(engine="tree"), {"gate", "check", "step", "batch"}, None),  # every screen 10x slower there
    ],
)
def test_forcing_flags_are_honoured_and_not_measured(tmp_path, monkeypatch, request_, measured_prefixes, expected):
    built: list[int] = []  # the steps' prefill: only where a check times steps
    over = batch_rows.DecodingSteps.over
    monkeypatch.setattr(batch_rows.DecodingSteps, "over", lambda *args: built.append(1) or over(*args))
    timer = FakeTimer(head__plain=0.1, head__bf16=1.0, head__int8=1.0, engine__fast=2.0, engine__tree=1.0)
    choices = choose(tiny("llama"), tmp_path, timer, request_)
    assert {name.split("/")[0] for name in timer.calls} == measured_prefixes
    assert len(built) == int(bool(measured_prefixes & {"step", "batch"}))  # one prefill serves every check
    if expected is not None:
        assert (choices.engine, choices.head, choices.draft_tokens) == expected
    for name, value in (("engine", request_.engine), ("head", request_.head)):
        if value != "auto":
            assert getattr(choices, name) == value


@pytest.mark.parametrize(
    "seconds, query_rows, work_rows, expected",
    [
        # half the rows cost about as much (latency-bound): doublings are tried
        (dict(batch__8=0.8, batch__4=0.7, batch__16=0.9, batch__32=1.8), 1, 99, 2.0),  # 1.125x taken, then 2x not
        (dict(batch__8=0.8, batch__4=0.8, batch__16=0.8, batch__32=0.8), 1, 99, 4.0),  # up to the memory rule's 32
        (dict(batch__8=0.8, batch__4=0.8, batch__16=0.8), 1, 10, 2.0),  # ... and until one batch holds the work
        (dict(batch__8=0.8, batch__4=0.7, batch__16=1.1), 1, 99, 1.0),  # neither more nor fewer rows pay
        # half the rows saved a real share: no doubling is tried (no doubled KV cache), halvings are
        (dict(batch__8=0.8, batch__4=0.35, batch__2=0.3), 1, 99, 0.5),  # a row costs clearly less at 4, not 2
        (dict(batch__8=0.8, batch__4=0.4), 1, 99, 1.0),  # a row costs the same at 4: the rule's (a batch's own costs)
        (dict(batch__8=0.8, batch__4=0.5), 1, 99, 1.0),  # a row costs more at 4: the rule's
        (dict(batch__8=0.8, batch__4=0.3), 8, 99, 1.0),  # ... and a halving never splits a query's rows
    ],
)
def test_batch_rows_are_measured_around_the_rule(monkeypatch, seconds, query_rows, work_rows, expected):
    monkeypatch.setattr(batch_rows, "rule_rows", lambda *args: 8)
    monkeypatch.setattr(batch_rows, "rows_by_memory", lambda *args: 32)
    lm = tiny("llama")
    steps = batch_rows.DecodingSteps.over(lm.model, work(lm)[0][0].ids, 1, 6, 0.3)
    timer = FakeTimer(**seconds)
    got, reason, measured = batch_rows.choose_batch_scale(steps, query_rows, work_rows, None, timer)
    assert got == expected and set(measured) == set(timer.seconds) == set(timer.calls)
    assert reason.startswith("the rule's 8 rows" if expected == 1 else f"{int(8 * expected)} rows, not the rule's 8")


def test_the_scale_is_a_power_of_two_where_the_rule_is_odd(monkeypatch):
    """The engines multiply the rule's bounds by the scale: half of 9 rows is a scale of 0.5, not 4/9."""
    monkeypatch.setattr(batch_rows, "rule_rows", lambda *args: 9)
    monkeypatch.setattr(batch_rows, "rows_by_memory", lambda *args: 32)
    lm = tiny("llama")
    steps = batch_rows.DecodingSteps.over(lm.model, work(lm)[0][0].ids, 1, 6, 0.3)
    timer = FakeTimer(batch__9=0.9, batch__4=0.35, batch__2=0.3)
    got, reason, _ = batch_rows.choose_batch_scale(steps, 1, 99, None, timer)
    assert got == 0.5 and reason.startswith("4 rows, not the rule's 9")


def test_a_rule_of_one_row_tries_doublings(monkeypatch):
    monkeypatch.setattr(batch_rows, "rule_rows", lambda *args: 1)
    monkeypatch.setattr(batch_rows, "rows_by_memory", lambda *args: 32)
    lm = tiny("llama")
    steps = batch_rows.DecodingSteps.over(lm.model, work(lm)[0][0].ids, 1, 6, 0.3)
    timer = FakeTimer(batch__1=1.0, batch__2=1.1, batch__4=2.5)  # no half of one row to compare with
    assert batch_rows.choose_batch_scale(steps, 1, 99, None, timer)[0] == 2.0 and timer.calls == list(timer.seconds)


def test_a_one_token_prompt_keeps_the_rule_and_no_drafts_unmeasured(tmp_path):
    lm = tiny("llama")
    prompts, rows = work(lm)
    one = replace(prompts[0], encoded=replace(prompts[0].encoded, ids=prompts[0].ids[:1]), hidden=())
    timer, request = FakeTimer(), EngineRequest(engine="tree", head="plain")  # no engine run: drafts, batch
    choices = Calibrator(lm.model, lm.tokenizer, request, cache=tmp_path, timer=timer).choose([one], rows, STOP)
    assert (choices.batch_scale, choices.draft_tokens) == (1.0, 0)
    assert not [name for name in timer.calls if name.startswith(("batch/", "step/"))]
    assert "one-token prompt" in choices.reasons["batch"] and "one-token prompt" in choices.reasons["drafts"]


@pytest.mark.parametrize("family", FAMILIES)
def test_a_timed_decoding_step_decodes_the_prompts_next_tokens(family, monkeypatch):
    """What the batch size and drafts are timed on is a real step: every row's tokens are the greedy tokens
    after each fed position, plain or screened. The steps' rooms are made without zeroing them: memory made
    here holds NaN, which a step reading a column it did not write would turn into other tokens."""
    new_empty = torch.Tensor.new_empty
    monkeypatch.setattr(
        torch.Tensor, "new_empty", lambda self, *size, **kw: new_empty(self, *size, **kw).fill_(math.nan)
    )
    lm = tiny(family)
    ids = work(lm)[0][0].ids
    whole = forward(lm.model, torch.tensor([ids]), keep_last=3).logits[0, -3:].argmax(-1)  # the whole prompt at once
    steps = batch_rows.DecodingSteps.over(lm.model, ids, 3, 6, 0.3)
    screen = calibrate.build_screen(lm.model, "int8")[0]
    for rows, fed, head in ((3, 3, None), (1, 1, None), (2, 2, screen)):  # smaller counts reuse the buffer
        step = steps.step(rows, head, fed)
        for _ in range(2):  # repeatable: the cache is rewound at every call
            assert step().tolist() == [whole[:fed].tolist()] * rows
    with pytest.raises(ValueError):
        steps.step(1, None, 4)
    with pytest.raises(ValueError):
        batch_rows.DecodingSteps.over(lm.model, ids[:3], 3, 6, 0.3)  # no cache left before the fed tokens


def test_one_prefill_gives_the_steps_cache_and_the_head_sample():
    lm = tiny("llama")
    ids = [1, 5, 9, 13, 17, 21, 3]
    kv, hidden = batch_rows.prompt_states(lm.model, ids, 4, 2)
    alone = batch_rows.prompt_states(lm.model, ids[:4], 4, 1)[0]  # a forward of the first four alone
    for (keys, values), (keys_alone, values_alone) in zip(kv, alone, strict=True):
        assert keys.shape == keys_alone.shape == values.shape
        assert torch.allclose(keys, keys_alone, atol=1e-6) and torch.allclose(values, values_alone, atol=1e-6)
    assert hidden.shape == (2, lm.model.config.hidden_size)
    assert torch.allclose(hidden, last_hidden(lm.model, torch.tensor([ids]), positions=2)[0], atol=1e-6)
    steps = batch_rows.DecodingSteps.over(lm.model, ids, 3, 6, 0.3)  # the steps keep that forward's states
    assert steps.final_states is not None and steps.final_states.shape == (len(ids), lm.model.config.hidden_size)
    assert torch.allclose(steps.final_states[-2:], hidden, atol=1e-6)
    assert torch.allclose(steps.kv[0][0], kv[0][0], atol=1e-6)  # the cache of all but the 3 fed tokens
    start = steps.prefix_kv(ids[:2])  # the keys and values of a prefix of the cached tokens: a view of them
    assert start is not None and len(start) == len(steps.kv)
    for (keys, values), (steps_keys, steps_values) in zip(start, steps.kv, strict=True):
        assert torch.equal(keys, steps_keys[:, :, :2]) and torch.equal(values, steps_values[:, :, :2])
    assert steps.prefix_kv([1, 9]) is None and steps.prefix_kv(ids[:5]) is None  # not the prompt's, not cached


def test_the_rule_bounds_rows_tokens_and_memory_and_scales():
    kv = batch_rows.prompt_states(tiny("llama").model, [1, 2, 3], 3, 1)[0]
    cpu = torch.device("cpu")
    assert fast.rule_rows(kv, 10, 32_000, 0.3, cpu) == fast.MAX_BATCH_ROWS  # 3200 by tokens: the row bound
    assert fast.rule_rows(kv, 1000, 32_000, 0.3, cpu) == 32  # by tokens
    assert fast.rule_rows(kv, 1000, 32_000, 0.3, cpu, scale=2) == 64
    assert fast.rule_rows(kv, 10, 32_000, 0.3, cpu, scale=0.5) == fast.MAX_BATCH_ROWS // 2
    assert fast.rule_rows(kv, 1000, 32_000, 1e-15, cpu, scale=2) == 1  # memory is not scaled


def test_measured_batch_scale_reaches_the_engine_and_a_forced_batch_is_not_measured(tmp_path, monkeypatch):
    monkeypatch.setattr(batch_rows, "rule_rows", lambda *args: 8)
    monkeypatch.setattr(batch_rows, "rows_by_memory", lambda *args: 64)
    lm = tiny("llama")
    timer = FakeTimer(batch__8=0.8, batch__4=0.8, batch__16=0.8, batch__32=3.2, engine__fast=2.0, engine__tree=1.0)
    choices = choose(lm, tmp_path, timer)
    assert choices.batch_scale == 2 and "batch: 2x the rule's rows (16 rows, not the rule's 8" in choices.line()
    engine = build_engine(lm.model, lm.tokenizer, choices)
    assert isinstance(engine, TreeEngine) and engine.batch_scale == 2
    forced = choose(lm, tmp_path, FakeTimer(), EngineRequest(batch_size=3))
    assert forced.batch_scale == 1 and forced.batch_size == 3
    assert not [name for name in forced.measured if name.startswith("batch/")]


def batch_verdicts(tmp_path) -> list[Path]:
    return list((tmp_path / "cal").glob("batch-*.json"))


def test_a_compute_bound_batch_verdict_is_kept_for_work_of_another_shape_over_a_cache_of_its_length(
    tmp_path, monkeypatch
):
    """Where half the rule's rows cost clearly less (decoding not latency-bound), the batch check's verdict stays,
    unmeasured, for work of another shape (here another condition) with the same head, rule, query rows and cache
    length to a power of two; another head, query rows or cache length measures again; a latency-bound verdict
    (doublings, bounded by the free memory and the work's rows) is not kept."""
    monkeypatch.setattr(batch_rows, "rule_rows", lambda *args: 16)
    monkeypatch.setattr(batch_rows, "rows_by_memory", lambda *args: 64)
    lm = tiny("llama")
    _, rows = work(lm)
    bf16 = EngineRequest(engine="tree", head="bf16")

    def run(timer, condition="instructions+examples", request=bf16, rows=rows):
        prompts = masked(encoded_prompts(lm.tokenizer), get_condition(condition))
        calibrator = Calibrator(lm.model, lm.tokenizer, request, cache=tmp_path / "cal", timer=timer)
        return calibrator.choose(prompts, rows, STOP)

    halving = dict(batch__16=1.6, batch__8=0.6)  # a row costs 0.1 s at 16, 0.075 at 8 (no fewer: a query has 5)
    first = run(FakeTimer(**halving))
    assert first.batch_scale == 0.5 and first.measured["batch/8"] == 0.6
    (verdict,) = batch_verdicts(tmp_path)
    kept = json.loads(verdict.read_text())
    assert kept["scale"] == 0.5 and kept["measured"] == {"batch/16": 1.6, "batch/8": 0.6}
    other = FakeTimer(batch__16=1.6, batch__8=1.6)  # latency-bound, were it measured
    choices = run(other, "examples")
    assert choices.batch_scale == 0.5 and not [name for name in other.calls if name.startswith("batch/")]
    assert choices.reasons["batch"].startswith(kept["reason"] + batch_rows.BATCH_CACHED)
    assert choices.measured["batch/8"] == 0.6  # the verdict's own timings stay on the record
    plain = FakeTimer(batch__16=1.6, batch__8=1.6)
    assert run(plain, "examples", EngineRequest(engine="tree", head="plain")).batch_scale == 1
    assert "batch/8" in plain.calls and len(batch_verdicts(tmp_path)) == 1  # measured, latency-bound: not kept
    fewer = FakeTimer(**halving, batch__4=0.2)  # a query of 2 rows: halvings below 8 rows may pay
    assert run(fewer, "examples", rows=rows[:2]).batch_scale == 0.25 and "batch/4" in fewer.calls
    monkeypatch.setattr(calibrate, "length_bucket", lambda tokens: 1 << 20)  # as if the cache were far longer
    longer = FakeTimer(**halving)
    assert run(longer, "examples").batch_scale == 0.5 and "batch/16" in longer.calls


@pytest.mark.parametrize(
    "kept",
    [
        {"scale": 0, "reason": "?", "measured": {}},
        {"scale": "half", "reason": "?", "measured": {}},
        {"scale": 0.5, "measured": {}},
        {"scale": 0.5, "reason": "?", "measured": {"batch/8": "fast"}},
        [0.5],
    ],
)
def test_a_malformed_batch_verdict_is_measured_again_and_overwritten(tmp_path, monkeypatch, kept):
    monkeypatch.setattr(batch_rows, "rule_rows", lambda *args: 16)
    lm = tiny("llama")
    request = EngineRequest(engine="tree", head="bf16")
    choose(lm, tmp_path, FakeTimer(batch__16=1.6, batch__8=0.6), request)
    (verdict,) = batch_verdicts(tmp_path)
    verdict.write_text(json.dumps(kept))
    again = FakeTimer(batch__16=1.6, batch__8=0.6)
    prompts, rows = work(lm)
    calibrator = Calibrator(lm.model, lm.tokenizer, request, cache=tmp_path / "cal", timer=again)
    assert calibrator.choose(prompts[:1], rows, STOP).batch_scale == 0.5 and "batch/16" in again.calls  # new work
    assert json.loads(verdict.read_text())["scale"] == 0.5


def test_a_screens_buffer_is_not_kept_past_the_batch_check_or_an_engines_work(tmp_path):
    """The screen's logits buffer grows to the largest batch it saw: the batch check's largest count, then
    the engine's batches; neither is kept once that work is done."""
    lm = tiny("llama")
    prompts, rows = work(lm)
    request = EngineRequest(engine="tree", head="int8", draft_tokens=0)
    calibrator = Calibrator(lm.model, lm.tokenizer, request, cache=tmp_path / "cal", timer=FakeTimer())
    choices = calibrator.choose(prompts, rows, STOP)
    screen = calibrator.screens["int8"]
    assert screen.buffer is None
    engine = build_engine(lm.model, lm.tokenizer, choices, calibrator)
    engine.generate(prompts, rows, STOP)
    assert isinstance(engine, TreeEngine) and engine.head is screen
    assert screen.stats["rows"] > 0 and screen.buffer is None


def test_the_screens_not_chosen_are_gone_before_the_batch_check(tmp_path):
    """A screen is a copy of the LM head: the batch check's steps (the calibration's largest allocations) run
    with the chosen one only."""
    lm = tiny("llama")
    prompts, rows = work(lm)
    calibrator = Calibrator(lm.model, lm.tokenizer, cache=tmp_path / "cal")
    seconds = {"head/plain": 1.0, "head/bf16": 0.7, "head/int8": 0.5, "engine/fast": 2.0, "engine/tree": 1.0}
    held: dict[str, set[str]] = {}

    def timer(name, fn):
        fn()
        if name.startswith("batch/"):
            held[name] = set(calibrator.screens)
        return seconds.get(name, 1.0)

    calibrator.timer = timer
    assert calibrator.choose(prompts, rows, STOP).head == "int8"
    assert held and all(kinds == {"int8"} for kinds in held.values())


def test_a_timed_call_on_a_gpu_waits_for_the_work_queued_before_it(monkeypatch):
    """GPU work runs after the host queues it: a timing synchronises before its clock starts (else it pays for
    the work queued before it) and after its work (else it times the queueing only)."""
    events = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: events.append(f"sync {device}"))
    measure_seconds("work", lambda: events.append("work"))  # the work's GPU is not known here: every one
    assert events == ["sync 0", "sync 1", "work", "sync 0", "sync 1"]
    events.clear()
    timing.synchronizer("cuda:1")()  # a known device: that one only
    timing.synchronizer("cpu")()
    assert events == ["sync cuda:1"]


def test_timings_compared_with_each_other_alternate():
    """Choices decided by a ratio are timed in alternation, so a machine's drift slows both sides alike."""
    ran: list[str] = []
    timer = FakeTimer(a=2.0, b=1.0)
    got = timing.interleaved(timer, {"a": lambda: ran.append("a"), "b": lambda: ran.append("b")}, 3)
    assert got == {"a": 2.0, "b": 1.0}
    assert timer.calls == ["a", "b"] * 3 and ran == ["a", "b"] * 4  # one warm-up each, then the rounds
    ran.clear()  # functions that ran just before (warmed up) are timed at once
    timing.interleaved(FakeTimer(), {"a": lambda: ran.append("a"), "b": lambda: ran.append("b")}, 3, warmed=True)
    assert ran == ["a", "b"] * 3
    settled = FakeTimer(a=2.0, b=1.0)  # a first round that decides already ends the measurement
    fns = {"a": lambda: None, "b": lambda: None}
    assert timing.interleaved(settled, fns, 3, lambda m: {"a"} if m["a"] > 1.5 * m["b"] else set()) == {
        "a": 2.0,
        "b": 1.0,
    }
    assert settled.calls == ["a", "b"]
    three = FakeTimer(a=3.0, b=1.0, c=1.1)  # one out of contention: the others are timed on
    fns = {"a": lambda: None, "b": lambda: None, "c": lambda: None}
    assert timing.interleaved(three, fns, 3, lambda m: {n for n, s in m.items() if s > 2 * min(m.values())}) == {
        "a": 3.0,
        "b": 1.0,
        "c": 1.1,
    }
    assert three.calls == ["a", "b", "c"] + ["b", "c"] * 2


def test_bad_requests_are_one_line_errors():
    for request in (
        EngineRequest(engine="gpu"),
        EngineRequest(head="int4"),
        EngineRequest(engine="fast", head="bf16"),
        EngineRequest(engine="fast", head="int8"),
        EngineRequest(head="int4"),
        EngineRequest(engine="fast", head="screen"),
        EngineRequest(engine="fast", draft_tokens=2),
    ):
        with pytest.raises(UserError):
            request.check()
    assert parse_draft_tokens("auto") is None and parse_draft_tokens("3") == 3
    with pytest.raises(UserError):
        parse_draft_tokens("many")


def test_a_forced_screen_on_a_model_that_cannot_take_it_is_refused(tmp_path):
    lm = load_model("tiny:llama", dtype="bfloat16")  # a bf16 head: nothing for a bf16 screen to gain
    for kind in ("bf16", "int8"):
        with pytest.raises(UserError, match=f"cannot screen the LM head of this model with {kind}"):
            choose(lm, tmp_path, FakeTimer(), EngineRequest(head=kind))
    with pytest.raises(UserError, match="--head screen: no screen of this model's LM head"):
        choose(lm, tmp_path, FakeTimer(), EngineRequest(head="screen"))
    auto = choose(lm, tmp_path, FakeTimer(engine__fast=2.0, engine__tree=1.0))
    assert auto.head == "plain" and auto.reasons["head"].startswith("no bf16 screen: the LM head is torch.bfloat16")
    assert "no int8 screen" in auto.reasons["head"]


@pytest.mark.parametrize("bf16, int8, expected", [(0.5, 0.7, "bf16"), (3.0, 2.0, "int8")])
def test_head_screen_takes_the_fastest_screen_even_where_the_plain_head_is_faster(tmp_path, bf16, int8, expected):
    timer = FakeTimer(head__plain=1.0, head__bf16=bf16, head__int8=int8, step__1=1.0, step__1_plus_2=2.0)
    choices = choose(tiny("llama"), tmp_path, timer, EngineRequest(head="screen"))
    assert (choices.engine, choices.head) == ("tree", expected)  # the flag needs the tree engine
    assert choices.reasons["head"].startswith("--head screen: the fastest screen, ")
    assert ("slower than the full product" in choices.reasons["head"]) == (expected == "int8")


def test_the_cache_is_keyed_and_reused_and_a_changed_key_measures_again(tmp_path, monkeypatch):
    lm = tiny("llama")
    first = FakeTimer(head__plain=1.0, head__bf16=0.5)
    measured = choose(lm, tmp_path, first)
    assert not measured.cached and first.calls
    again = FakeTimer(head__plain=0.5, head__bf16=1.0)  # would choose otherwise: not asked
    cached = choose(lm, tmp_path, again)
    assert cached.cached and not again.calls and cached.head == measured.head == "bf16"
    entries = lambda: sorted(p.name.startswith("head-") for p in (tmp_path / "cal").glob("*.json"))  # noqa: E731
    assert entries() == [False, True]  # the work's choices, the machine and model's head
    # another request, another shape of work: each measures again, all but the head (the same machine and model)
    forced = FakeTimer(head__plain=0.5, head__bf16=1.0)
    assert choose(lm, tmp_path, forced, EngineRequest(engine="tree")).head == "bf16"
    assert forced.calls and not timed_heads(forced)
    prompts, rows = work(lm)
    other_shape = FakeTimer(head__plain=0.5, head__bf16=1.0)
    choices = Calibrator(lm.model, lm.tokenizer, cache=tmp_path / "cal", timer=other_shape).choose(
        prompts, rows[:3], STOP
    )
    assert other_shape.calls and not timed_heads(other_shape)
    assert choices.head == "bf16" and choices.reasons["head"].endswith(calibrate.HEAD_CACHED)
    assert choices.measured["head/bf16"] == 0.5  # the verdict's own timings stay on the record
    # another machine: everything again, the head too
    real = calibration_cache.hardware
    other = lambda device: dict(real(device), cpu_capability=f"not {real(device)['cpu_capability']}")  # noqa: E731
    monkeypatch.setattr(calibration_cache, "hardware", other)
    other_machine = FakeTimer(head__plain=0.5, head__bf16=1.0, head__int8=1.0)
    assert choose(lm, tmp_path, other_machine).head == "plain" and "plain" in timed_heads(other_machine)
    assert entries() == [False] * 4 + [True] * 2


@pytest.mark.parametrize("kept", ["{torn", "[1, 2]", "unreadable"])
def test_a_cache_entry_that_cannot_be_read_is_measured_again(kept, tmp_path, monkeypatch, refuse_reading):
    """A torn entry, one that is not a JSON object, or one the process may not read (another user's, in a shared
    cache): the calibration measures again instead of failing, and keeps what it measured."""
    cache = calibration_cache.CalibrationCache(tmp_path)
    cache.put("k", dict(head="plain"))
    assert cache.get("k") == dict(head="plain")
    entry = tmp_path / "k.json"
    if kept == "unreadable":
        refuse_reading("read_text", entry)
    else:
        entry.write_text(kept)
    assert cache.get("k") is None
    monkeypatch.undo()
    lm = tiny("llama")
    prompts, rows = work(lm)
    calibrator = Calibrator(lm.model, lm.tokenizer, cache=tmp_path / "cal", timer=FakeTimer(head__plain=1.0))
    key = calibrator.key(prompts, rows, None, STOP)
    (tmp_path / "cal").mkdir()
    (tmp_path / "cal" / f"{key}.json").write_text(kept if kept != "unreadable" else "{torn")
    choices = calibrator.choose(prompts, rows, STOP)
    assert not choices.cached and calibration_cache.CalibrationCache(tmp_path / "cal").get(key) is not None


def test_the_works_key_follows_what_sets_its_rows(tmp_path):
    """Work of another condition, token limit or number of prompts (each to a power of two) is measured again:
    they change what the rows share and how many a batch holds."""
    lm = tiny("llama")
    prompts, rows = work(lm)  # 3 prompts
    calibrator = Calibrator(lm.model, lm.tokenizer, cache=tmp_path)
    key = lambda ps=prompts, stop=STOP: calibrator.key(ps, rows, None, stop)  # noqa: E731
    assert key() == key(prompts + prompts[:1]) and key(stop=StopRule((), 7)) == key()  # 4 prompts; 8 tokens
    assert key(prompts + prompts) != key() and key(prompts[:2]) != key()
    assert key(stop=StopRule((), 9)) != key()
    assert key(masked(encoded_prompts(lm.tokenizer), get_condition("examples"))) != key()


def test_the_head_alone_is_chosen_forced_and_cached(tmp_path):
    """What `prune` asks: the LM head only (no engine, no drafts measured), from the same verdict as an
    engine's choices on this machine and model."""
    lm = tiny("llama")
    prompts, _ = work(lm)

    def head_only(timer, request=AUTO_REQUEST):
        calibrator = Calibrator(lm.model, lm.tokenizer, request, cache=tmp_path / "cal", timer=timer)
        kind, reason = calibrator.choose_head(prompts)
        return kind, reason, calibrator.screen(kind)

    first = FakeTimer(head__plain=1.0, head__bf16=0.7, head__int8=0.5)
    kind, reason, screen = head_only(first)
    assert (kind, screen.kind) == ("int8", "int8") and "int8 screen 2.0x faster" in reason
    assert {name.split("/")[0] for name in first.calls} == {"check", "gate"}  # the heads only: one round decides
    again = FakeTimer(head__plain=0.1)
    kind, reason, _ = head_only(again)
    assert kind == "int8" and reason.endswith(calibrate.HEAD_CACHED) and not again.calls
    forced = FakeTimer()
    assert head_only(forced, EngineRequest(head="plain"))[::2] == ("plain", None) and not forced.calls
    engine = FakeTimer(head__plain=0.1)
    choices = choose(lm, tmp_path, engine)  # an engine's choices: another entry, the head's verdict taken
    assert choices.head in ("int8", "plain") and not timed_heads(engine)
    assert "int8 screen 2.0x faster" in choices.reasons["head"]
    assert len(list((tmp_path / "cal").glob("*.json"))) == 2


def head_verdicts(tmp_path) -> list[Path]:
    return list((tmp_path / "cal").glob("head-*.json"))


@pytest.mark.parametrize(
    "kept",
    [
        {"head": "fp4", "reason": "?", "measured": {}},
        {"head": "int8"},
        {"head": "int8", "reason": "?", "measured": {"head/int8": "fast"}},
        [1, 2],
        "x",
    ],
)
def test_a_malformed_head_verdict_is_measured_again_and_overwritten(tmp_path, kept):
    lm = tiny("llama")
    first = FakeTimer(head__plain=1.0, head__bf16=0.5)
    choose(lm, tmp_path, first, EngineRequest(engine="tree"))
    (verdict,) = head_verdicts(tmp_path)
    verdict.write_text(json.dumps(kept))
    again = FakeTimer(head__plain=1.0, head__int8=0.5)
    assert choose(lm, tmp_path, again, EngineRequest(engine="tree", draft_tokens=0)).head == "int8"
    assert "plain" in timed_heads(again) and json.loads(verdict.read_text())["head"] == "int8"


@pytest.mark.parametrize(
    "request_, head",
    [
        (EngineRequest(head="bf16"), "bf16"),
        (EngineRequest(head="plain"), "plain"),
        (EngineRequest(engine="fast"), "plain"),
    ],
)
def test_a_forced_head_neither_keeps_nor_takes_a_verdict(tmp_path, request_, head):
    lm = tiny("llama")
    assert choose(lm, tmp_path, FakeTimer(), request_).head == head
    assert not head_verdicts(tmp_path)
    assert choose(lm, tmp_path, FakeTimer(head__plain=1.0, head__int8=0.5)).head == "int8"  # a verdict: int8
    (verdict,) = head_verdicts(tmp_path)
    kept = verdict.read_text()
    assert choose(lm, tmp_path, FakeTimer(), replace(request_, batch_size=3)).head == head
    assert verdict.read_text() == kept


def test_a_verdict_that_does_not_hold_here_is_measured_again_and_a_prompts_refusal_is_not_kept(tmp_path, monkeypatch):
    """A kept screen is rebuilt and checked on this work's states; a screen this prompt's sample refused
    refuses it for this work only (another prompt may agree)."""
    lm = tiny("llama")
    tree = EngineRequest(engine="tree", draft_tokens=0)
    assert choose(lm, tmp_path, FakeTimer(head__plain=1.0, head__int8=0.5), tree).head == "int8"
    for module in (calibrate, head_timing):  # the kept verdict's check and the measurement's
        monkeypatch.setattr(module, "screen_agrees", lambda screen, hidden, plain=None: screen.kind != "int8")
    again = FakeTimer(head__plain=1.0, head__bf16=0.5, head__int8=0.1)
    choices = choose(lm, tmp_path, again, EngineRequest(engine="tree", draft_tokens=2))
    assert choices.head == "bf16" and "plain" in timed_heads(again) and "head/int8" not in choices.measured
    assert json.loads(head_verdicts(tmp_path)[0].read_text())["head"] == "int8"  # not replaced by this refusal


def drafts_refusals(tmp_path) -> list[Path]:
    return list((tmp_path / "cal").glob("drafts-*.json"))


REFUSE = dict(step__1=1.0, step__1_plus_2=2.0, engine__fast=2.0, engine__tree=1.0)  # a CPU: drafts cost
ACCEPT = dict(step__1=1.0, step__1_plus_2=1.0, step__1_plus_4=1.0, step__1_plus_8=1.0)  # would take drafts of 8


def tree(rows: int, head: str = "int8") -> EngineRequest:
    return EngineRequest(engine="tree", head=head, batch_size=rows)


def test_a_drafts_refusal_is_kept_and_taken_by_work_of_more_rows_over_a_cache_of_its_length(tmp_path, monkeypatch):
    """Drafts refused on R rows stay refused, unmeasured, for work of at least R rows over a cache of the same
    length to a power of two, on this machine, model and head; fewer rows, another head or another cache
    length measure again; drafts taken are not kept."""
    lm = tiny("llama")
    first = FakeTimer(**REFUSE)
    assert choose(lm, tmp_path, first, tree(4)).draft_tokens == 0 and "step/1+2" in first.calls
    (refusal,) = drafts_refusals(tmp_path)
    kept = json.loads(refusal.read_text())
    assert kept["rows"] == 4 and kept["measured"] == {"step/1": 1.0, "step/1+2": 2.0}
    more = FakeTimer(**ACCEPT)
    choices = choose(lm, tmp_path, more, tree(8))
    assert choices.draft_tokens == 0 and not [c for c in more.calls if c.startswith("step/")]
    assert choices.reasons["drafts"] == kept["reason"] + draft_timing.DRAFTS_CACHED
    assert choices.measured["step/1+2"] == 2.0  # the refusal's own timings stay on the record
    for other in (tree(2), tree(16, head="plain")):  # fewer rows; another head's steps
        timer = FakeTimer(**ACCEPT)
        assert choose(lm, tmp_path, timer, other).draft_tokens == 8 and "step/1+8" in timer.calls
    assert len(drafts_refusals(tmp_path)) == 1 and json.loads(refusal.read_text()) == kept  # takings not kept
    monkeypatch.setattr(calibrate, "length_bucket", lambda tokens: 1 << 20)  # as if the cache were far longer
    longer = FakeTimer(**ACCEPT)
    assert choose(lm, tmp_path, longer, tree(32)).draft_tokens == 8 and "step/1+2" in longer.calls


def test_a_refusal_timed_on_one_row_is_neither_kept_nor_taken(tmp_path):
    """A single row's step can run other kernels than several rows' (matrix-vector products)."""
    lm = tiny("llama")
    assert choose(lm, tmp_path, FakeTimer(**REFUSE), tree(1)).draft_tokens == 0
    assert not drafts_refusals(tmp_path)
    choose(lm, tmp_path, FakeTimer(**REFUSE), tree(4))
    (refusal,) = drafts_refusals(tmp_path)
    refusal.write_text(json.dumps(json.loads(refusal.read_text()) | dict(rows=1)))
    again = FakeTimer(**ACCEPT)
    assert choose(lm, tmp_path, again, tree(8)).draft_tokens == 8 and "step/1+2" in again.calls


@pytest.mark.parametrize(
    "kept",
    [
        {"reason": "?", "measured": {}},
        {"rows": "2", "reason": "?", "measured": {}},
        {"rows": True, "reason": "?", "measured": {}},
        {"rows": 0, "reason": "?", "measured": {}},
        {"rows": 2, "measured": {}},
        {"rows": 2, "reason": "?", "measured": {"step/1": None}},
        {"rows": 2, "reason": "?", "measured": [1.0]},
        [1],
    ],
)
def test_a_malformed_drafts_refusal_is_measured_again_and_overwritten(tmp_path, kept):
    lm = tiny("llama")
    choose(lm, tmp_path, FakeTimer(**REFUSE), tree(4, head="plain"))
    (refusal,) = drafts_refusals(tmp_path)
    refusal.write_text(json.dumps(kept))
    again = FakeTimer(**REFUSE)
    assert choose(lm, tmp_path, again, tree(8, head="plain")).draft_tokens == 0  # whole queries: 5 rows a batch
    assert "step/1+2" in again.calls and json.loads(refusal.read_text())["rows"] == 5


def test_forced_drafts_neither_take_nor_keep_a_refusal(tmp_path):
    lm = tiny("llama")
    forced = FakeTimer(**REFUSE)
    assert choose(lm, tmp_path, forced, EngineRequest(engine="tree", draft_tokens=0)).draft_tokens == 0
    assert not drafts_refusals(tmp_path) and not [c for c in forced.calls if c.startswith("step/1+")]
    choose(lm, tmp_path, FakeTimer(**REFUSE), tree(4))
    assert len(drafts_refusals(tmp_path)) == 1
    assert (
        choose(lm, tmp_path, FakeTimer(), EngineRequest(engine="tree", draft_tokens=2, batch_size=8)).draft_tokens == 2
    )


@pytest.mark.parametrize(
    "ratios, drafts, timed, kept_rows",
    [
        ({16: 2.0, 75: 2.0}, 0, {16}, 16),  # refused on the probe: more rows are not timed
        ({16: 1.0, 75: 2.0}, 0, {16, 75}, 75),  # taken on the probe, refused on the engine's rows
        ({16: 1.0, 75: 1.0}, 8, {16, 75}, None),  # taken on both: nothing kept
    ],
)
def test_drafts_are_probed_on_a_few_rows_and_timed_on_the_engines_rows_only_where_they_paid(
    tmp_path, monkeypatch, ratios, drafts, timed, kept_rows
):
    monkeypatch.setattr(batch_rows, "rule_rows", lambda *args: 64)
    monkeypatch.setattr(batch_rows, "choose_batch_scale", lambda *args: (1.0, "not timed here", {}))
    rows_of_steps: list[int] = []
    real_step = batch_rows.DecodingSteps.step

    def step(self, rows, screen, fed=1):
        rows_of_steps.append(rows)
        return real_step(self, rows, screen, fed)

    monkeypatch.setattr(batch_rows.DecodingSteps, "step", step)

    def timer(name, fn):
        fn()
        return 1.0 if name == "step/1" else ratios[rows_of_steps[-1]]

    lm = tiny("llama")
    prompts, rows = work(lm)

    def calibrate_for(request):
        calibrator = Calibrator(lm.model, lm.tokenizer, request, tmp_path / "cal", timer)
        return calibrator.choose(prompts * 10, rows, STOP)  # 150 rows of work

    # the rule's 64 states take 18 of the 30 queries (3.5 states each), spread evenly: batches of 15 (75 rows)
    choices = calibrate_for(EngineRequest(engine="tree", head="plain"))
    assert choices.draft_tokens == drafts and set(rows_of_steps) == timed
    assert choices.reasons["batch"].endswith(TREE_BATCH_NOTE)  # the tree engine's batches count states
    steps_measured = {name: s for name, s in choices.measured.items() if name.startswith("step/")}
    if drafts:
        assert not drafts_refusals(tmp_path) and steps_measured["step/1+8"] == 1.0
        return
    reason = choices.reasons["drafts"]
    assert f"on {kept_rows} rows here (> 1.1x" in reason and ("engine's 75 rows" in reason) == (kept_rows == 16)
    assert steps_measured == {"step/1": 1.0, "step/1+2": 2.0}  # the round that decided, on its rows
    (refusal,) = drafts_refusals(tmp_path)
    assert json.loads(refusal.read_text())["rows"] == kept_rows
    rows_of_steps.clear()  # work of other rows takes the refusal as it was timed
    # forced batches count rows in whole queries of 5: kept_rows + 5 holds at least kept_rows
    again = calibrate_for(EngineRequest(engine="tree", head="plain", batch_size=kept_rows + 5))
    assert not rows_of_steps and again.reasons["drafts"].startswith(
        f"a step of 3 tokens costs 2.0x one token's on {kept_rows} rows here (> 1.1x);"
    )
    assert "engine's" not in again.reasons["drafts"]  # the rows of the work it was timed for are not replayed


def test_the_engine_takes_the_screen_the_calibration_built(tmp_path):
    lm = tiny("llama")
    prompts, rows = work(lm)
    calibrator = Calibrator(lm.model, lm.tokenizer, EngineRequest(engine="tree", head="int8"), cache=tmp_path)
    choices = calibrator.choose(prompts, rows, STOP)
    engine = build_engine(lm.model, lm.tokenizer, choices, calibrator)
    assert isinstance(engine, TreeEngine) and engine.head is calibrator.screens["int8"]
    assert engine.head.stats["rows"] == 0  # its counts start with the engine, not the calibration


def test_a_real_measurement_records_its_timings_and_hardware(tmp_path):
    choices = choose(tiny("llama"), tmp_path, timing.measure_seconds)
    assert {"gate/plain", "step/1", "engine/fast", "engine/tree"} <= set(choices.measured)
    for kind in SCREENS:  # checked (timed), then timed against the rest or out (a tiny head's fixed costs may dominate)
        assert f"check/{kind}" in choices.measured
        assert f"head/{kind}" in choices.measured or f"{kind} screen " in choices.reasons["head"]
    assert [name for name in choices.measured if name.startswith("batch/")]
    assert all(v > 0 for v in choices.measured.values())
    assert choices.hardware["cpu_capability"] and choices.hardware["threads"] >= 1
    line = choices.line()
    assert line.startswith(f"engine: {choices.engine} (") and "head:" in line and "calibration" in line
    assert Choices.from_dict(json.loads(json.dumps(choices.as_dict()))) == choices


def configurations(lm):
    yield Choices("fast", "plain", 0, None, {})
    yield Choices("tree", "plain", 0, None, {})
    yield Choices("tree", "plain", 3, None, {})
    yield Choices("tree", "plain", 0, 2, {})
    yield Choices("tree", "plain", 0, None, {}, batch_scale=1 / 64)  # 4 rows: a query's rows split
    yield Choices("fast", "plain", 0, None, {}, batch_scale=1 / 128)
    for kind, screen in SCREENS.items():
        if screen.unsupported_reason(lm.model) is None:
            yield Choices("tree", kind, 0, None, {})
            yield Choices("tree", kind, 3, None, {})


@pytest.mark.parametrize("family", FAMILIES)
def test_every_choice_decodes_the_reference_tokens(family):
    lm = tiny(family)
    prompts, rows = work(lm)
    stop = StopRule((), 8)
    reference = ReferenceEngine(lm.model, lm.tokenizer).generate(prompts, rows, stop)
    expected = {k: g.token_ids for k, g in reference.items()}
    seen = set()
    for choices in configurations(lm):
        engine = build_engine(lm.model, lm.tokenizer, choices)
        if isinstance(engine, TreeEngine) and choices.head != "plain" and engine.head is None:
            continue  # the model's logits are not head(hidden): the engine refuses to screen
        seen.add(choices.summary())
        got = engine.generate(prompts, rows, stop)
        assert {k: g.token_ids for k, g in got.items()} == expected, choices.summary()
    assert len(seen) >= 4


def test_a_sweep_stores_the_chosen_path_and_the_machine(tmp_path, data_dir, capsys):
    store = tmp_path / "s.sqlite"
    assert (
        main(
            [
                "sweep",
                "--model",
                "tiny:llama",
                "--store",
                str(store),
                "--data-dir",
                str(data_dir),
                "--pairs",
                "fra-eng",
                "--ks",
                "1",
                "--n-test",
                "2",
                "--max-new-tokens",
                "4",
                "--layers",
                "0,2,4",
            ]
        )
        == 0
    )
    err = capsys.readouterr().err
    assert "engine: " in err and "head: " in err and "torch CPU capability" in err
    db = sqlite3.connect(store)
    (provenance,) = db.execute("SELECT provenance FROM runs").fetchone()
    engines = json.loads(provenance)["engines"]
    assert len(engines) == 1 and engines[0]["engine"] in ("tree", "fast")
    assert engines[0]["hardware"]["cpu_capability"] and "engine" in engines[0]["reasons"]
    assert main(["report", str(store), "--format", "md"]) == 0
    report = (tmp_path / "s_report" / "report.md").read_text()
    assert f"engine {engines[0]['engine']} (" in report and "torch CPU capability" in report
    assert f"; batch {Choices.from_dict(engines[0]).batch_line()} ({engines[0]['reasons']['batch']}); on " in report


def test_bench_json_keeps_the_hardware_and_the_choices(tmp_path, data_dir, capsys):
    out = tmp_path / "bench.json"
    assert (
        main(
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
                "--skip-paper",
                "--engine",
                "tree",
                "--head",
                "plain",
                "--draft-tokens",
                "0",
                "--data-dir",
                str(data_dir),
                "--json",
                str(out),
            ]
        )
        == 0
    )
    data = json.loads(out.read_text())
    hardware = data["hardware"]
    assert {"cpu", "cpu_capability", "gpu", "threads"} <= set(hardware)
    assert (hardware["choices"]["engine"], hardware["choices"]["head"]) == ("tree", "plain")
    assert data["identical_fraction_spec"] == 1.0
    # (a) skipped: null in the JSON (NaN is not JSON), "skipped" in the table, speed-ups against (b)
    assert data["seconds_paper"] is None and data["speedup_vs_paper"] is None and "NaN" not in out.read_text()
    table = capsys.readouterr().out
    assert "speed-up vs (b)" in table and "nan" not in table.lower()
    assert [line.split()[-2] for line in table.splitlines() if line.startswith("(a) paper")] == ["skipped"]


def test_a_sweep_measures_once_per_shape_of_work(tmp_path, data_dir):
    """Units of another condition are measured again (what their rows share differs); units of another seed
    only are not (the same shape); each measurement is stored with the run."""
    store = tmp_path / "s.sqlite"
    common = ["--model", "tiny:llama", "--data-dir", str(data_dir), "--pairs", "fra-eng", "--ks", "1"]
    args = [*common, "--n-test", "2", "--max-new-tokens", "4", "--layers", "0,2,4", "--seeds", "0,1"]
    assert main(["sweep", "--store", str(store), "--conditions", "examples,instructions+examples", *args]) == 0
    db = sqlite3.connect(store)
    assert db.execute("SELECT COUNT(*) FROM units").fetchone()[0] == 4
    (provenance,) = db.execute("SELECT provenance FROM runs").fetchone()
    assert len(json.loads(provenance)["engines"]) == 2


RULE_KEPT = dict(batch__8=0.8, batch__4=0.5)  # the batch check's step costs: half the rows cost more a row
RULE_TIMES_4 = dict(batch__4=0.8, batch__8=0.8, batch__16=0.8, batch__32=0.8)  # doubling is free up to the work's


@pytest.mark.parametrize(
    "condition, forced, memory, batch_costs, expected",
    [
        ("instructions+examples", None, 1000, RULE_KEPT, 10),  # whole queries of 3.5 states: 2 a batch of 8
        ("instructions+examples", None, 7, RULE_KEPT, 5),  # ... but the KV-memory bound holds 7 rows unshared
        ("instructions", None, 1000, RULE_KEPT, 8),  # a context cache a row: the fast engine's batches of 8
        ("instructions+examples", 8, 1000, RULE_KEPT, 5),  # --batch-size counts rows: one whole query of 5
        ("instructions+examples", None, 1000, RULE_TIMES_4, 30),  # 4x the rule's 8: all 6 queries a batch
    ],
)
def test_the_head_is_timed_on_the_rows_of_the_tree_engines_largest_batch(
    tmp_path, monkeypatch, condition, forced, memory, batch_costs, expected
):
    def rule(*args):  # the rule's 8 rows, times the engine's measured scale (its sixth argument)
        return int(8 * (args[5] if len(args) > 5 else 1))

    for module in (batch_rows, fast):
        monkeypatch.setattr(module, "rule_rows", rule)
    monkeypatch.setattr(batch_rows, "rows_by_memory", lambda *args, **kwargs: memory)
    monkeypatch.setattr(tree_engine, "rows_by_memory", lambda *args, **kwargs: memory)
    lm = tiny("llama")
    prompts = masked(encoded_prompts(lm.tokenizer), get_condition(condition)) * 2  # 6 queries
    rows = work(lm)[1]  # 5 a query
    costs = dict(head__plain=1.0, head__bf16=0.5, head__int8=0.7, step__1=1.0, step__1_plus_2=2.0)
    timer = FakeTimer(**costs, **batch_costs)
    request = EngineRequest(engine="tree", batch_size=forced)
    choices = Calibrator(lm.model, lm.tokenizer, request, tmp_path, timer).choose(prompts, rows, STOP)
    chunks: list[int] = []
    real = tree_engine.TreeDecode
    monkeypatch.setattr(
        tree_engine, "TreeDecode", lambda engine, chunk, *args: chunks.append(len(chunk)) or real(engine, chunk, *args)
    )
    build_engine(lm.model, lm.tokenizer, choices).generate(prompts, rows, STOP)
    assert max(chunks) == expected and f"on {expected} rows" in choices.reasons["head"]
    rescaled = batch_costs is RULE_TIMES_4  # the head and drafts were chosen at the rule's rows, then again
    assert all(("chosen again for the" in choices.reasons[name]) == rescaled for name in ("head", "drafts"))


def test_a_halved_memory_bound_rule_is_what_the_engine_takes_and_the_head_follows_it(tmp_path, monkeypatch):
    """The rule bound by KV memory (40 rows): the batch check finds half of it faster a row, the engine's
    batches are made of the rows it timed (the factor scales the rule's rows, within the memory bound), and
    the head, chosen first for the rule's batches (30 rows), is chosen again for those (15 rows, another power
    of two), where another screen is faster."""
    for module in (batch_rows, fast, tree_engine):
        monkeypatch.setattr(module, "rows_by_memory", lambda *args, **kwargs: 40)
    lm = tiny("llama")
    prompts = masked(encoded_prompts(lm.tokenizer), get_condition("instructions+examples")) * 2  # 6 queries
    rows = work(lm)[1]  # 5 a query, 3.5 states
    checked: list[str] = []

    def timer(name, fn):  # bf16 the faster head until the batch check has run, then int8
        fn()
        checked.extend([name] if name.startswith("batch/") else [])
        costs = {"head/plain": 1.0, "head/bf16": 0.9 if checked else 0.5, "head/int8": 0.7, "batch/40": 4.0}
        return dict(costs, **{"batch/20": 1.0, "step/1": 1.0, "step/1+2": 2.0}).get(name, 1.0)

    calibrator = Calibrator(lm.model, lm.tokenizer, EngineRequest(engine="tree"), tmp_path, timer)
    choices = calibrator.choose(prompts, rows, STOP)
    assert choices.batch_scale == 0.5 and "20 rows, not the rule's 40" in choices.reasons["batch"]
    assert choices.head == "int8" and set(calibrator.screens) == {"int8"} and choices.measured["head/bf16"] == 0.9
    assert "on 15 rows" in choices.reasons["head"] and "15 rows a batch holds" in choices.reasons["head"]
    assert choices.reasons["drafts"].endswith("scale, which ran with bf16)")
    chunks: list[int] = []
    real = tree_engine.TreeDecode
    monkeypatch.setattr(
        tree_engine, "TreeDecode", lambda engine, chunk, *args: chunks.append(len(chunk)) or real(engine, chunk, *args)
    )
    engine = build_engine(lm.model, lm.tokenizer, choices, calibrator)
    engine.generate(prompts, rows, STOP)
    assert max(chunks) == 15 and isinstance(engine, TreeEngine) and engine.head is calibrator.screens["int8"]


def test_one_calibrator_builds_each_screen_once(tmp_path, monkeypatch):
    """A screen is a copy of the head: work of another shape measured by the same calibrator takes the screen
    it kept, when it times the heads again."""
    built: list[str] = []
    real = head_timing.build_screen
    monkeypatch.setattr(
        head_timing, "build_screen", lambda model, kind, *a: built.append(kind) or real(model, kind, *a)
    )
    monkeypatch.setattr(calibrate, "build_screen", lambda model, kind, *a: built.append(kind) or real(model, kind, *a))
    lm = tiny("llama")
    timer = FakeTimer(head__plain=1.0, head__bf16=0.5, head__int8=0.7, engine__fast=2.0, engine__tree=1.0)
    calibrator = Calibrator(lm.model, lm.tokenizer, EngineRequest(engine="tree"), tmp_path, timer, use_cache=False)
    rows = work(lm)[1]
    for condition in ("instructions+examples", "examples"):
        choices = calibrator.choose(masked(encoded_prompts(lm.tokenizer), get_condition(condition)), rows, STOP)
        assert choices.head == "bf16" and build_engine(lm.model, lm.tokenizer, choices, calibrator).head is not None
    # the chosen screen: timed twice, built once (the other is dropped after each choice: memory)
    assert built.count("bf16") == 1 and head_timings(timer, "bf16") > 1


def test_the_chosen_screen_is_kept_with_its_model_for_later_calibrations_and_engines(tmp_path, monkeypatch):
    """A screen is a copy of the head: the one a calibration chose, or an engine was given, serves every later
    calibrator and engine of the same model (a sweep's pruning, a notebook's engines), built once; a plain choice
    drops it."""
    lm = tiny("llama")
    prompts, _ = work(lm)
    bf16 = SCREENS["bf16"]
    built: list[CertifiedHead] = []  # the screens built on the model's whole head (the slice gate's are on a copy)
    init = bf16.__init__
    monkeypatch.setattr(bf16, "__init__", lambda self, model, *a: built.append(self) or init(self, model, *a))

    def head(timer):
        calibrator = Calibrator(lm.model, lm.tokenizer, cache=tmp_path / "cal", timer=timer, use_cache=False)
        kind, _ = calibrator.choose_head(prompts)
        return kind, calibrator.screen(kind)

    def on_the_head() -> list[CertifiedHead]:
        return [screen for screen in built if screen.head is lm.model.get_output_embeddings()]

    kind, first = head(FakeTimer(head__plain=1.0, head__bf16=0.5))
    assert kind == "bf16" and on_the_head() == [first] and kept_screen(lm.model, "bf16") is first
    kind, again = head(FakeTimer(head__plain=1.0, head__bf16=0.5))
    assert kind == "bf16" and again is first and on_the_head() == [first]
    assert TreeEngine(lm.model, lm.tokenizer, head_kind="bf16").head is first
    assert kept_screen(lm.model, "int8") is None and build_screen(lm.model, "int8")[0] is not first
    forget_kept_screens()  # a screen asked of a calibrator that measured nothing (cached choices) is kept too
    made = Calibrator(lm.model, lm.tokenizer, cache=tmp_path / "cal").screen("bf16")
    assert made is not first and kept_screen(lm.model, "bf16") is made
    kind, _ = head(FakeTimer(head__plain=0.1, head__bf16=0.5))
    assert kind == "plain" and kept_screen(lm.model, "bf16") is None


def test_a_kept_screen_is_not_taken_for_another_head_or_softcap_and_does_not_keep_its_model(monkeypatch):
    """A kept screen serves its model's head as it was built for: a head module replaced, a weight given new storage
    (``.data =``, a move), a softcap set since or a screen switched off builds another. It holds no reference to
    the model: it goes with it."""
    lm = tiny("llama")
    screen = build_screen(lm.model, "bf16")[0]
    keep_screen(lm.model, screen)
    assert build_screen(lm.model, "bf16")[0] is screen
    with monkeypatch.context() as patch:
        patch.setattr(lm.model.config, "final_logit_softcapping", 5.0, raising=False)
        assert kept_screen(lm.model, "bf16") is None
    with monkeypatch.context() as patch:
        head = lm.model.get_output_embeddings()
        other = torch.nn.Linear(head.in_features, head.out_features, bias=False)
        patch.setattr(lm.model, "get_output_embeddings", lambda: other)
        assert kept_screen(lm.model, "bf16") is None
    weight = lm.model.get_output_embeddings().weight
    with monkeypatch.context() as patch:
        patch.setattr(weight, "data", weight.data.clone())
        assert kept_screen(lm.model, "bf16") is None
    assert kept_screen(lm.model, "bf16") is screen
    with monkeypatch.context() as patch:
        patch.setattr(screen, "disabled", True)
        assert kept_screen(lm.model) is None
    own = load_model("tiny:llama")
    keep_screen(own.model, build_screen(own.model, "bf16")[0])
    model = weakref.ref(own.model)
    del own
    gc.collect()
    assert model() is None


def test_a_kept_screen_is_the_next_calibrators_until_it_disagrees_or_a_cached_plain_choice_drops_it(
    tmp_path, monkeypatch
):
    """A later calibrator starts from the kept screen (no slice gate for its kind, no new copy); one that disagrees
    with the plain head on this work's sample is dropped and a new one measured; an engine gets it with its counts
    at zero; and work whose cached choice is the plain head keeps none."""
    lm = tiny("llama")
    prompts, _ = work(lm)

    def calibrator(timer=None, cache="cal"):
        return Calibrator(lm.model, lm.tokenizer, cache=tmp_path / cache, timer=timer or FakeTimer(), use_cache=True)

    assert calibrator(FakeTimer(head__plain=1.0, head__bf16=0.5)).choose_head(prompts)[0] == "bf16"
    kept = kept_screen(lm.model, "bf16")
    assert kept is not None and kept.buffer is None  # kept without the logits buffer its check grew
    assert calibrator().screens == {"bf16": kept}
    kept.stats["rows"] = 5
    assert TreeEngine(lm.model, lm.tokenizer, head_kind="bf16").head is kept and kept.stats["rows"] == 0
    monkeypatch.setattr(calibrate, "screen_agrees", lambda screen, hidden, plain=None: screen is not kept)
    again = calibrator(FakeTimer(head__plain=1.0, head__bf16=0.5))
    assert again.choose_head(prompts)[0] == "bf16" and again.screen("bf16") is not kept
    assert kept_screen(lm.model, "bf16") is again.screen("bf16")
    assert choose(lm, tmp_path / "plain", FakeTimer(head__plain=0.1, engine__fast=0.5)).head == "plain"
    keep_screen(lm.model, kept)
    assert choose(lm, tmp_path / "plain", FakeTimer()).cached and kept_screen(lm.model) is None


def sample(lm, rows: int = 32) -> torch.Tensor:
    """``rows`` final states of the first test prompt's last positions (the heads' timing sample)."""
    prompts, _ = work(lm)
    states = last_hidden(lm.model, torch.tensor([prompts[0].ids]), positions=len(prompts[0].ids))[0]
    return head_timing.head_sample(states, rows)


@pytest.mark.parametrize("kind", KINDS)
def test_a_screen_on_a_slice_of_the_vocabulary_decodes_that_slice(kind):
    """The gate's stand-in (``VocabularySlice``): a screen built on it is the screen of every (V // tokens)-th
    token of the head, softcapped as the model's logits are."""
    model = head_model(vocab=5000, d=64, softcap=30.0)
    hidden = with_outlier_channels(torch.randn(24, 64) * 3)
    part = head_timing.VocabularySlice(model, 1200)
    screen = SCREENS[kind](part)
    rows = model.lm_head.weight[::4][:1200]  # 5000 // 1200 = 4
    assert torch.equal(part.lm_head.weight, rows) and part.config is model.config
    plain = 30.0 * torch.tanh(hidden @ rows.T / 30.0)  # [24, 1200]
    assert torch.allclose(screen.full_logits(hidden), plain, atol=1e-5)
    assert torch.equal(screen.argmax(hidden), plain.argmax(-1))


def int8_usable(model) -> list[str]:
    """The screens this machine gives ``model``'s head (skips the test where the int8 one is not among them:
    its product is not exact here)."""
    usable = [kind for kind in SCREENS if SCREENS[kind].unsupported_reason(model) is None]
    if "int8" not in usable:
        pytest.skip("no exact int8 product on this machine")
    return usable


def heads_called(monkeypatch) -> list[tuple[str, int]]:
    """Record each screen call's (kind, tokens of the head it covers)."""
    calls: list[tuple[str, int]] = []
    argmax = CertifiedHead.argmax
    monkeypatch.setattr(
        CertifiedHead, "argmax", lambda self, h: calls.append((self.kind, len(self.weight))) or argmax(self, h)
    )
    return calls


@pytest.mark.parametrize(
    "slice_int8, check_int8, int8_timed",
    [(3.0, 1.0, False), (1.2, 1.0, True), (2.0, 1.0, True), (1.2, 2.8, False)],
)
def test_a_screen_far_slower_on_a_slice_of_the_vocabulary_is_not_built_on_all_of_it(
    monkeypatch, slice_int8, check_int8, int8_timed
):
    """Both products grow with the tokens they cover: a screen already GATE_CLEAR times slower than the full
    product on a slice of the vocabulary is out before it is built on the whole head (a slow int8 kernel would
    cost several full calls in its set-up and check); one that slow in its check on the whole sample is timed
    no more; one under the limit in both is timed."""
    monkeypatch.setattr(head_timing, "SLICE_MIN_TOKENS", 16)
    lm = tiny("llama")
    usable = int8_usable(lm.model)
    vocab = lm.model.get_output_embeddings().weight.shape[0]
    assert head_timing.slice_tokens(vocab) == 16
    built: list[str] = []
    real = head_timing.build_screen
    monkeypatch.setattr(
        head_timing, "build_screen", lambda model, kind, *a: built.append(kind) or real(model, kind, *a)
    )
    calls = heads_called(monkeypatch)
    timer = FakeTimer(slice__plain=1.0, slice__int8=slice_int8, gate__plain=1.0, check__int8=check_int8)
    timer.seconds |= {"head/plain": 1.0, "head/bf16": 0.8, "head/int8": 0.5}
    timing_ = head_timing.time_heads(lm.model, sample(lm), "auto", timer, {})
    assert {name for name in timer.calls if name.startswith("slice/")} == {f"slice/{k}" for k in ("plain", *usable)}
    assert {kind for kind, tokens in calls if tokens == 16} == set(usable)  # every screen timed on the slice
    passed = slice_int8 < head_timing.GATE_CLEAR
    assert ("int8" in built) == ("check/int8" in timer.calls) == (("int8", vocab) in calls) == passed
    assert timing_.measured["slice/int8"] == slice_int8 and timing_.measured["slice/plain"] == 1.0  # kept
    assert timing_.kind == ("int8" if int8_timed else "bf16") and timing_.shared
    assert ("head/int8" in timing_.measured) == int8_timed
    gated = {
        3.0: f"int8 screen 3.0x slower than the full product on 16 of {vocab} tokens (all 32 rows) here",
        2.8: "int8 screen 2.8x slower than the full product on 32 rows here",
    }
    assert any(text in timing_.reason for text in gated.values()) != int8_timed


def test_a_screen_built_before_is_not_gated_again(monkeypatch):
    """A screen the calibration built already (``built``: its copy of the head is paid) skips the slice and is
    checked on the whole sample, while the others are gated."""
    monkeypatch.setattr(head_timing, "SLICE_MIN_TOKENS", 16)
    lm = tiny("llama")
    int8_usable(lm.model)
    timer = FakeTimer(slice__plain=1.0, slice__bf16=3.0, head__plain=1.0, head__int8=0.5)
    int8 = SCREENS["int8"](lm.model)
    timing_ = head_timing.time_heads(lm.model, sample(lm), "auto", timer, {"int8": int8})
    assert "slice/int8" not in timer.calls and "slice/bf16" in timer.calls and "check/int8" in timer.calls
    assert timing_.kind == "int8" and timing_.screens["int8"] is int8 and "bf16" not in timing_.screens


def test_a_screens_timed_check_runs_on_its_logits_buffer_made_before():
    """A screen's timed check can decide the heads' comparison (a clear win there): its logits' buffer is made
    and touched before it is timed, so the check times the screen as later calls run it, not a fresh buffer's
    page faults."""
    lm = tiny("llama")
    usable = [kind for kind in SCREENS if SCREENS[kind].unsupported_reason(lm.model) is None]
    built = {kind: SCREENS[kind](lm.model) for kind in usable}
    hidden = sample(lm)
    checked: list[str] = []

    def timer(name, fn):
        if not name.startswith("check/"):
            return measure_seconds(name, fn)
        screen = built[name[6:]]
        buffer, (shape, dtype) = screen.buffer, screen.logits_layout(len(hidden))
        assert buffer is not None and buffer.dtype == dtype and buffer.numel() == math.prod(shape)
        seconds = measure_seconds(name, fn)
        assert screen.buffer is buffer  # the timed call ran in it
        checked.append(name[6:])
        return seconds

    head_timing.time_heads(lm.model, hidden, "auto", timer, built)
    assert sorted(checked) == sorted(usable) and usable


@pytest.mark.parametrize("unfit", ["no linear head", "another logits formula"])
def test_no_slice_gate_where_the_screens_cannot_take_the_head(monkeypatch, unfit):
    """A head no screen can take, or logits that are not the head's: no slice is timed, and the screens' builds
    say why they are refused."""
    monkeypatch.setattr(head_timing, "SLICE_MIN_TOKENS", 16)
    lm = tiny("llama")
    hidden = sample(lm)
    if unfit == "no linear head":
        monkeypatch.setattr(lm.model, "get_output_embeddings", lambda: torch.nn.Identity())
        why = "not a plain linear layer"
    else:
        monkeypatch.setattr(lm.model.config, "final_logit_softcapping", 5.0, raising=False)
        why = "its logits are not softcap(lm_head(last hidden state))"
    timer = FakeTimer()
    timing_ = head_timing.time_heads(lm.model, hidden, "auto", timer, {})
    assert timing_.kind == "plain" and not [name for name in timer.calls if name.startswith("slice/")]
    assert all(f"no {kind} screen: " in timing_.reason for kind in SCREENS) and why in timing_.reason


def test_no_slice_gate_where_a_slice_would_be_much_of_the_vocabulary():
    """A slice of more than 1/SLICE_MAX_SHARE of the vocabulary would build each screen about twice: the screens
    are checked and timed on the whole head at once."""
    assert head_timing.slice_tokens(4 * head_timing.SLICE_MIN_TOKENS) == head_timing.SLICE_MIN_TOKENS
    assert head_timing.slice_tokens(4 * head_timing.SLICE_MIN_TOKENS - 1) is None
    assert head_timing.slice_tokens(262144) == 262144 // head_timing.SLICE_FRACTION
    lm = tiny("llama")
    timer = FakeTimer(head__plain=1.0, head__bf16=0.8, head__int8=0.5)
    timing_ = head_timing.time_heads(lm.model, sample(lm), "auto", timer, {})
    assert timing_.kind == "int8" and not [name for name in timer.calls if name.startswith("slice/")]
