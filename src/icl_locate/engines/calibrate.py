"""Measure, then choose: every hardware-dependent choice of an engine, timed on the loaded model.

Which engine and LM head are fastest depends on the machine, not on the method: a bf16 screen of
the LM head pays off only where bf16 products are faster than fp32 ones (CPUs with AVX-512 BF16,
GPUs), an int8 screen where int8 products are (most x86 CPUs), sharing across mask layers pays off
when the body is what costs, and drafts pay off only where a decoding step fed a few more tokens
costs about as much as one fed one (latency-bound decoding, GPUs).
So an engine starts by timing each choice on the model itself, briefly, and picks the faster:

- head: the model's own LM head vs each screened head (bf16, int8, int8-linear: ``engines/head.py``) this model
  can take, on as many final hidden states of the first prompt as the tree engine's batches have rows
  (``head_timing.py``), or this machine and model's verdict for about as many rows kept from an
  earlier calibration (its screen checked on this prompt's states);
- drafts: a decoding step fed 1 + N tokens against one fed 1 token, over the first prompt's cache, at
  ``DRAFT_PROBE_ROWS`` rows first and at the engine's rows only where drafts paid there
  (``draft_timing.py``), or a refusal kept for this machine, model and head that covers these rows;
- engine: a short run of up to 10 of the first query's rows on the fast engine and on the tree engine with
  the head and drafts chosen above, both continuing the same prefix caches (``engine_timing.py``);
- batch size: one decoding step (with the chosen head) over the first prompt's cache at the engines'
  automatic rule's row count, at half of it, and at doublings or further halvings; a count other than the
  rule's only where it was measured to pay (``batch_rows.py``), or the verdict kept where decoding was found
  not latency-bound. The factor applies to the rule's rows (within the KV-memory bound), which the tree
  engine counts in a query's states (``tree.query_states``). The screens not chosen are dropped before it (a
  screen is a copy of the head); the chosen one is kept with the model for its later calibrations and engines
  in this process (``screens.keep_screen``). Where the factor changes the rows of the tree engine's batches,
  the drafts are chosen again for those rows, and the head where they are of another power of two.

Every choice can be forced (``EngineRequest``); generations are the same whatever is chosen (the
engines are tested against the reference engine). The result is cached under the cache directory,
keyed by the machine, the model, its dtype and device, the library versions and the shape of the
work (rows per query, their kinds, the condition, the first prompt's length, the token limit and the
number of prompts, each of these three to a power of two), so a second run pays nothing. Three
verdicts are also kept beyond the work they were measured on (``calibration_cache.py`` says under
what and why): the head's, a refusal of drafts and the batch check's. So work of another shape on the
same model (another condition or task, a method unit, ``prune``) measures only what depends on it.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict, replace
from pathlib import Path

import torch

from ..core.checkpoints import cache_dir
from ..core.conditions import MaskedPrompt
from ..core.structure import num_layers
from ..util.errors import UserError
from ..util.system import hardware
from .base import Engine, StopRule, last_hidden
from .batch_rows import DecodingSteps, choose_batch
from .calibration_cache import (
    CalibrationCache,
    calibration_identity,
    digest,
    length_bucket,
    valid_head_verdict,
    verdict_key,
)
from .choices import Choices
from .draft_timing import DRAFT_LENGTHS, choose_drafts
from .engine_timing import time_engines
from .fast import KV_MEMORY_FRACTION, FastEngine, scaled_rows
from .head import CertifiedHead
from .head_timing import HEAD_TIMINGS, head_sample, screen_agrees, time_heads
from .request import AUTO_REQUEST, EngineRequest
from .rows import plan_rows
from .screens import SCREENS, build_screen, keep_screen, kept_screen
from .timing import Timer, drop_timings, measure_seconds
from .tree import TreeEngine, tree_batch_rows

# final hidden states the heads are timed on where the engine's batch rows are not known (``choose_head``); else
# on as many as the engine's batches hold: a screen's cost per row depends on the rows (a product of a few rows
# streams the whole head for each; of many, it is bound by arithmetic, where bf16 and int8 units differ)
HEAD_SAMPLE_ROWS = 16
NO_STEPS = "a one-token prompt leaves no cache to time a step over"
# ends the tree engine's batch reason: its batches take whole queries by their states (``tree.query_states``)
TREE_BATCH_NOTE = "; the tree engine fills them with whole queries, counting each query's states, not its rows"
HEAD_CACHED = "; measured before for this model here"  # ends a head reason taken from an earlier verdict


class Calibrator:
    """Chooses an engine's configuration for the rows at hand (see the module docstring).

    ``timer(name, fn)`` runs ``fn`` once and returns its seconds (tests inject fake timings by
    name: "head/plain", "head/KIND" and the gate's "slice/plain", "slice/KIND", "gate/plain", "check/KIND";
    "step/1", "step/1+N", "engine/fast", "engine/tree", "batch/ROWS")."""

    def __init__(
        self,
        model,
        tokenizer,
        request: EngineRequest = AUTO_REQUEST,
        cache: Path | None = None,
        timer: Timer = measure_seconds,
        use_cache: bool = True,
    ):
        request.check()
        self.model, self.tokenizer, self.request = model, tokenizer, request
        self.calibration_cache = CalibrationCache(
            cache if cache is not None else cache_dir() / "calibration", use_cache
        )
        self.timer = timer
        self.device = next(model.parameters()).device
        self.n_layers = num_layers(model)
        self._states: tuple[MaskedPrompt, torch.Tensor] | None = None  # (prompt, its final states [positions, d])
        kept = kept_screen(model)  # an earlier calibration's choice for this model (``screens.keep_screen``)
        self.screens: dict[str, CertifiedHead] = {kept.kind: kept} if kept else {}  # built so far, by kind

    # ------------------------------------------------------------------ entry

    def choose(
        self, prompts: Sequence[MaskedPrompt], interventions: Sequence, stop: StopRule, model_id: dict | None = None
    ) -> Choices:
        """The choices for decoding ``interventions`` on ``prompts`` (cached per machine, model and work)."""
        key = self.key(prompts, interventions, model_id, stop)
        cached = self.calibration_cache.get(key)
        if cached is not None:
            try:
                choices = replace(Choices.from_dict(cached), cached=True)
            except TypeError:
                pass  # an old entry: measure again
            else:
                if choices.head == "plain":
                    self._keep_screen("plain")  # no screen for this work: none kept for later work either
                return choices
        started = time.perf_counter()
        choices = self.measure(prompts, interventions, stop, model_id)
        choices.calibration_seconds = time.perf_counter() - started
        self.calibration_cache.put(key, choices.as_dict())
        return choices

    def choose_head(
        self, prompts: Sequence[MaskedPrompt], model_id: dict | None = None, rows: int = HEAD_SAMPLE_ROWS
    ) -> tuple[str, str]:
        """The LM head alone, for an engine with no other choice (the pruned engine, whose head calls take up
        to ``rows`` rows): its kind and the measured reason (the head's verdict for this machine, model and
        rows, measured where there is none)."""
        started = time.perf_counter()
        reasons: dict[str, str] = {}
        measured: dict[str, float] = {}
        kind, kept = self._choose_head(prompts[0], max(1, rows), reasons, measured, model_id)
        self._keep_screen(kind)
        if kept:
            return kind, reasons["head"]
        return kind, f"{reasons['head']}; calibration {time.perf_counter() - started:.1f}s"

    def screen(self, kind: str) -> CertifiedHead | None:
        """The ``kind`` screen of the model's head (None for "plain"): the one the measurement built, else the one
        kept for the model or a new one (a screen's set-up, e.g. the int8 copy of the head, is paid once), kept
        for the model's later calibrations and engines (``screens.keep_screen``)."""
        if kind == "plain":
            return None
        if kind not in self.screens:
            screen, why_not = build_screen(self.model, kind)
            if screen is None:
                raise UserError(f"cannot screen the LM head of this model with {kind}: {why_not}; use --head plain")
            self.screens[kind] = screen
            keep_screen(self.model, screen)
        return self.screens[kind]

    def _keep_screen(self, kind: str) -> None:
        """Drop the screens measured but not chosen (a screen is a copy of the LM head: memory a run would carry);
        the chosen one is kept with the model for later calibrations and engines (``screens.keep_screen``)."""
        self.screens = {k: screen for k, screen in self.screens.items() if k == kind}
        keep_screen(self.model, self.screens.get(kind))

    def identity(self, model_id: dict | None) -> dict:
        """What every timing here depends on (``calibration_cache.calibration_identity``)."""
        return calibration_identity(self.model, model_id)

    def key(
        self, prompts: Sequence[MaskedPrompt], interventions: Sequence, model_id: dict | None, stop: StopRule
    ) -> str:
        """The identity (machine, model, ...) + the shape of the work + the request. The shape: the rows a query
        has and their kinds, the condition (what the rows share depends on what it hides), the first prompt's
        length and the token limit to a power of two (they set the rule's rows), and the number of prompts to a
        power of two (the tree engine's batches hold whole queries)."""
        kinds = sorted({type(row).__name__ for row in interventions})
        first = prompts[0] if prompts else None
        spec = self.identity(model_id) | dict(
            rows_per_query=len(interventions),
            prompt_tokens=length_bucket(len(first.ids)) if first else 0,
            kinds=kinds,
            condition=first.condition.name if first and first.condition else None,
            max_new_tokens=length_bucket(stop.max_new_tokens),
            prompts=length_bucket(len(prompts)),
            request=asdict(self.request),
        )
        return digest(spec)

    # ------------------------------------------------------------------ measuring

    def measure(
        self, prompts: Sequence[MaskedPrompt], interventions: Sequence, stop: StopRule, model_id: dict | None = None
    ) -> Choices:
        reasons: dict[str, str] = {}
        measured: dict[str, float] = {}
        work_rows = len(prompts) * len(interventions)
        steps = self._steps(prompts[0], stop)
        try:
            rows = self._batch_rows(steps, work_rows, prompts, interventions)
            engine = self.request.engine
            tree_only = self.request.tree_only_flags()
            if engine == "auto" and tree_only:  # the fast engine has neither: the flag decides the engine
                engine = "tree"
                reasons["engine"] = f"{tree_only} (the tree engine's alone)"
            head = "plain" if engine == "fast" else self._choose_head(prompts[0], rows, reasons, measured, model_id)[0]
            drafts = 0
            if engine == "fast":
                reasons["head"] = "the fast engine uses the model's own head"
                reasons["drafts"] = "the fast engine has no drafts"
            else:
                drafts = self._choose_drafts(steps, rows, head, reasons, measured, model_id)
            if engine == "auto":
                engine = self._choose_engine(prompts[0], interventions, stop, (head, drafts), steps, reasons, measured)
                if engine == "fast":
                    head, drafts = "plain", 0
                    reasons["head"] = f"the fast engine uses the model's own head (tree engine: {reasons['head']})"
                    reasons["drafts"] = f"the fast engine has no drafts (tree engine: {reasons['drafts']})"
            elif "engine" not in reasons:
                reasons["engine"] = "forced"
            self._keep_screen(head)
            scale = self._choose_batch(steps, len(interventions), work_rows, head, reasons, measured, model_id)
            if engine == "tree" and scale != 1:
                scaled = self._batch_rows(steps, work_rows, prompts, interventions, scale)
                head, drafts = self._at_batch_scale(
                    steps, prompts[0], (rows, scaled), (head, drafts), reasons, measured, model_id
                )
            if engine == "tree" and not self.request.batch_size:
                reasons["batch"] += TREE_BATCH_NOTE
        finally:
            if steps is not None:
                steps.release()
        return Choices(
            engine, head, drafts, self.request.batch_size, reasons, measured, hardware(self.device), batch_scale=scale
        )

    def _batch_rows(
        self,
        steps: DecodingSteps | None,
        work_rows: int,
        prompts: Sequence[MaskedPrompt],
        interventions: Sequence,
        scale: float = 1.0,
    ) -> int:
        """The rows of the tree engine's largest batch, whose head and drafts are chosen here
        (``tree.tree_batch_rows``: the rule's rows times ``scale`` within the KV-memory bound, or --batch-size,
        filled as the engine fills them); ``HEAD_SAMPLE_ROWS`` where no steps were made to read the rule from;
        the whole work where it is smaller."""
        forced = self.request.batch_size
        if forced:
            size, unshared = forced, None
        elif steps is not None:
            size, unshared = scaled_rows(steps.rule, steps.by_memory, scale), steps.by_memory
        else:
            return max(1, min(HEAD_SAMPLE_ROWS, work_rows))
        query = plan_rows(prompts[:1], interventions, self.n_layers)
        rows = tree_batch_rows(query, len(prompts), size, self.n_layers, unshared, forced=bool(forced))
        return max(1, min(rows, work_rows))

    def _at_batch_scale(
        self,
        steps: DecodingSteps | None,
        prompt: MaskedPrompt,
        batch_rows: tuple[int, int],
        chosen: tuple[str, int],
        reasons: dict,
        measured: dict,
        model_id: dict | None,
    ) -> tuple[str, int]:
        """The drafts and head chosen again (those not forced) where the batch check's factor changed the rows
        of the tree engine's batches (``batch_rows``: at the rule's rows, then at the factor): they were chosen
        for the rule's rows, and which is faster depends on the rows. The head only where the rows are of
        another power of two (a verdict is kept per power of two, as everywhere; the screens dropped before the
        batch check are built again to be timed); the drafts wherever they changed (a refusal holds for at
        least as many rows, an acceptance for no others: ``_choose_drafts`` asks the cache). The first choice's
        timings leave ``measured``; the batch check's stay, with the head it ran."""
        (head, drafts), (before, rows) = chosen, batch_rows
        note = f" (chosen again for the {rows} rows a batch holds at the batch check's scale, which ran with {head})"
        if self.request.head in ("auto", "screen") and length_bucket(rows) != length_bucket(before):
            for prefix in HEAD_TIMINGS:
                drop_timings(measured, prefix)
            head = self._choose_head(prompt, rows, reasons, measured, model_id)[0]
            reasons["head"] += note
            self._keep_screen(head)
        if self.request.draft_tokens is None and rows != before:
            drop_timings(measured, "step/")
            drafts = self._choose_drafts(steps, rows, head, reasons, measured, model_id)
            reasons["drafts"] += note
        return head, drafts

    def _steps(self, prompt: MaskedPrompt, stop: StopRule) -> DecodingSteps | None:
        """Steps over the first prompt's cache, fed its last tokens (as many as the longest draft verifies);
        None where no check will time them (forced) or the prompt leaves no cache. The forward that makes
        the cache also gives the head's samples (``_sample_hidden``): one prefill of the prompt, not two."""
        request, ids = self.request, prompt.ids
        if len(ids) < 2 or (request.batch_size and (request.engine == "fast" or request.draft_tokens is not None)):
            return None
        fed = min(1 + max(DRAFT_LENGTHS), len(ids) - 1)
        steps = DecodingSteps.over(self.model, ids, fed, stop.max_new_tokens, KV_MEMORY_FRACTION)
        assert steps.final_states is not None  # ``over`` keeps them
        self._states = (prompt, steps.final_states)
        return steps

    def _choose_batch(
        self,
        steps: DecodingSteps | None,
        query_rows: int,
        work_rows: int,
        head: str,
        reasons: dict,
        measured: dict,
        model_id: dict | None,
    ) -> float:
        """The factor on the rule's rows: forced (1), or ``batch_rows.choose_batch``'s: the verdict kept for this
        machine, model, head, rule, query rows and cache length, else measured (kept where compute-bound)."""
        if self.request.batch_size or steps is None:
            reasons["batch"] = "forced" if self.request.batch_size else f"the rule's rows ({NO_STEPS})"
            return 1.0
        shape = dict(head=head, rule=steps.rule, query_rows=query_rows, cache=length_bucket(steps.length - 1))
        key = verdict_key("batch", self.identity(model_id), **shape)
        scale, reasons["batch"], seconds = choose_batch(
            steps, query_rows, work_rows, self.screen(head), self.timer, self.calibration_cache, key
        )
        measured.update(seconds)
        return scale

    def _sample_hidden(self, prompt: MaskedPrompt, rows: int = HEAD_SAMPLE_ROWS) -> torch.Tensor:
        """``rows`` final hidden states of the prompt's last positions: rows like those the head decodes (the
        prompt's forward runs once: ``_steps`` keeps its states, or the first call here)."""
        if self._states is None or self._states[0] is not prompt:
            ids = torch.tensor([prompt.ids], device=self.device)
            self._states = (prompt, last_hidden(self.model, ids, positions=len(prompt.ids))[0])
        return head_sample(self._states[1], rows)

    def _choose_head(
        self, prompt: MaskedPrompt, rows: int, reasons: dict, measured: dict, model_id: dict | None
    ) -> tuple[str, bool]:
        """The head asked for, or (auto) this machine and model's verdict for head calls of about ``rows`` rows:
        kept from an earlier calibration (its screen, the one kept for the model or a new one, checked on this
        prompt's sample), else measured on ``rows`` rows and kept; and whether it was the kept verdict."""
        if self.request.head != "auto":
            return self._measure_head(prompt, rows, reasons, measured)[0], False
        key = verdict_key("head", self.identity(model_id), rows=length_bucket(rows))
        verdict = self.calibration_cache.get(key)
        if valid_head_verdict(verdict, ("plain", *SCREENS)) and self._holds_here(verdict["head"], prompt):
            reasons["head"] = verdict["reason"] + HEAD_CACHED
            measured.update(verdict["measured"])
            return verdict["head"], True
        started = time.perf_counter()
        timings: dict[str, float] = {}
        kind, shared = self._measure_head(prompt, rows, reasons, timings)
        measured.update(timings)
        if shared:
            seconds = time.perf_counter() - started
            self.calibration_cache.put(
                key, dict(head=kind, reason=reasons["head"], measured=timings, calibration_seconds=seconds)
            )
        return kind, False

    def _holds_here(self, kind: str, prompt: MaskedPrompt) -> bool:
        """Whether a kept verdict's screen builds for this model and gives the plain head's tokens on this
        prompt's sample (the model in memory may differ from the one the verdict was measured on)."""
        if kind == "plain":
            return True
        screen = self.screens.get(kind) or build_screen(self.model, kind)[0]
        if screen is None or not screen_agrees(screen, self._sample_hidden(prompt)):
            self.screens.pop(kind, None)  # measured again with a screen built anew, not this one
            if kept_screen(self.model, kind) is screen:
                keep_screen(self.model, None)
            return False
        self.screens[kind] = screen
        return True

    def _measure_head(self, prompt: MaskedPrompt, rows: int, reasons: dict, measured: dict) -> tuple[str, bool]:
        """The head asked for, or the fastest (``head_timing.py``) timed on ``rows`` rows of the prompt's sample,
        and whether the verdict holds for the model whatever the prompt; the screens built are kept."""
        if self.request.head == "plain":
            reasons["head"] = "forced"
            return "plain", False
        timing = time_heads(self.model, self._sample_hidden(prompt, rows), self.request.head, self.timer, self.screens)
        self.screens.update(timing.screens)
        reasons["head"] = timing.reason
        measured.update(timing.measured)
        return timing.kind, timing.shared

    def _choose_drafts(
        self,
        steps: DecodingSteps | None,
        rows: int,
        head: str,
        reasons: dict,
        measured: dict,
        model_id: dict | None,
    ) -> int:
        """The draft length asked for, or (auto) ``draft_timing.choose_drafts``'s: none where a refusal kept for
        this machine, model, head and cache length covers this work's rows, else measured (a refusal is kept)."""
        if self.request.draft_tokens is not None:
            reasons["drafts"] = "forced"
            return self.request.draft_tokens
        if steps is None:
            reasons["drafts"] = NO_STEPS
            return 0
        key = verdict_key("drafts", self.identity(model_id), head=head, cache=length_bucket(steps.length - 1))
        drafts, reasons["drafts"], seconds = choose_drafts(
            steps, rows, self.screen(head), self.timer, self.calibration_cache, key
        )
        measured.update(seconds)
        return drafts

    def _choose_engine(
        self,
        prompt: MaskedPrompt,
        interventions: Sequence,
        stop: StopRule,
        chosen: tuple[str, int],
        steps: DecodingSteps | None,
        reasons: dict,
        measured: dict,
    ) -> str:
        """The faster engine on the first query's rows (``engine_timing.py``), the tree engine with the head and
        drafts ``chosen`` (its screen measured above: set up already, the int8 copy of the head is no per-token
        cost)."""
        (head, drafts), size = chosen, self.request.batch_size
        fast = FastEngine(self.model, self.tokenizer, batch_size=size)
        tree = TreeEngine(
            self.model, self.tokenizer, batch_size=size, head_kind=head, draft_tokens=drafts, screen=self.screen(head)
        )
        engine, reasons["engine"], seconds = time_engines(fast, tree, prompt, interventions, stop, steps, self.timer)
        measured.update(seconds)
        return engine


def build_engine(model, tokenizer, choices: Choices, calibrator: Calibrator | None = None) -> Engine:
    """The engine ``choices`` describe (with the screen ``calibrator`` built to measure it, if any)."""
    if choices.engine == "fast":
        return FastEngine(model, tokenizer, batch_size=choices.batch_size, batch_scale=choices.batch_scale)
    return TreeEngine(
        model,
        tokenizer,
        batch_size=choices.batch_size,
        batch_scale=choices.batch_scale,
        head_kind=choices.head,
        draft_tokens=choices.draft_tokens,
        screen=calibrator.screen(choices.head) if calibrator is not None else None,
    )
