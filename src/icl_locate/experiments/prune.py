"""``icl-locate prune``: context-pruned inference against full processing of the same requests.

Full processing is the same engine with r = L (and the same LM head: the model's own or a screened
one, measured or forced as in a sweep), so the comparison isolates pruning: analytic
FLOPs, measured time (prompt processing and decoding), KV cache bytes, peak memory, the task
score and the share kept, the paper's estimate, and (by default) a check that every pruned
generation equals masking the same range from r: the layer sweep's own rows where ``--store`` holds
them for the very same prompts and token limit (``stored_masked``), else the fast engine's.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch

from ..core.conditions import MaskedPrompt
from ..core.costs import ModelDims, paper_savings, request_flops
from ..core.interventions import MaskFrom
from ..core.models import LoadedModel, load_model
from ..core.prompts import PromptedItem
from ..engines.base import Engine, Generation, StopRule
from ..engines.calibrate import Calibrator
from ..engines.fast import FastEngine
from ..engines.pruned import PrunedEngine, check_supported, prune_split
from ..engines.request import EngineRequest
from ..engines.timing import synchronizer
from ..results.store import Store
from ..tasks.items import build_items, post_process
from ..tasks.spec import Task
from ..util.errors import UserError
from ..util.fileio import check_writable, write_json_atomic
from ..util.system import (
    current_rss_mb,
    hardware,
    hardware_line,
    peak_rss_mb,
    reset_peak_rss,
    return_free_memory,
)
from .common import check_context, fingerprint, layer_from_condition, masked_prompts, provenance, stop_rule
from .options import PruneSettings
from .settings import check_count, task_and_data


def run_prune(s: PruneSettings, command: str, log=print, loaded: LoadedModel | None = None) -> PruneResult:
    """Validate, load (unless ``loaded``: the model as ``s`` names it, loaded already), measure, write the JSON
    and the store entry."""
    check_count("--max-new-tokens", s.max_new_tokens)
    check_count("--batch-size", s.batch_size)
    check_count("--n-test", s.n_test)
    EngineRequest(head=s.head).check()
    condition = layer_from_condition(s.condition, "prune")
    out = check_writable(s.json) if s.json else None
    task, data = task_and_data(s, s.pair, log)
    if loaded is None:
        loaded = load_model(s.model, dtype=s.dtype, device=s.device)
    model = loaded.model
    assert model is not None  # load_model always loads the weights
    check_supported(model)
    store = Store.open(s.store, fingerprint(loaded), attach=True) if s.store else None
    try:
        n_layers = loaded.info.num_layers
        if not 0 <= s.layer <= n_layers:
            raise UserError(f"--layer must be in 0..{n_layers}, got {s.layer}")
        items = build_items(
            task, data, loaded.tokenizer, k=s.k, seed=s.seed, n_test=s.n_test, per_query_examples=s.per_query_examples
        )
        stop = stop_rule(task, s.max_new_tokens)
        check_context(items, loaded, stop.max_new_tokens)
        prompts = masked_prompts(items, condition)
        for p in prompts:
            prune_split(p)  # a condition pruning cannot run fails here, before any work
        log(
            f"prune: {loaded.info.spec} ({loaded.info.dtype}, {loaded.info.device}), {task.name} {data.label}, "
            f"{condition.name} pruned from layer {s.layer} of {n_layers}, {len(items)} requests, k={s.k}"
        )
        machine = hardware(loaded.info.device)
        calibrator = Calibrator(model, loaded.tokenizer, EngineRequest(head=s.head))
        # the pruned engine's head calls: a batch of requests, one row each
        head_kind, head_reason = calibrator.choose_head(prompts, loaded.info.as_dict(), min(s.batch_size, len(prompts)))
        screen = calibrator.screen(head_kind)
        log(
            f"engine: pruned, {s.batch_size} requests a batch (--batch-size); head: {head_kind} ({head_reason}), "
            f"the same in the full and the pruned runs; on {hardware_line(machine)}"
        )
        examples = [it.item for it in items]

        def score(texts: list[str]) -> float:
            return task.metric.score(texts, examples, data).corpus[task.metric.name]

        result = measure_pruning(
            loaded,
            task,
            items,
            prompts,
            s.layer,
            s.k,
            score,
            stop,
            pruned_engine=lambda: PrunedEngine(model, loaded.tokenizer, s.batch_size, head=screen),
            masked_engine=FastEngine(model, loaded.tokenizer, screen=screen) if s.check else None,
            batch_size=s.batch_size,
            log=log,
            stored=stored_masked(store, task, condition.name, prompts, s.layer, stop)
            if store is not None and s.check
            else None,
        )
        result.data["hardware"] = machine
        result.data["head"] = dict(kind=head_kind, reason=head_reason)
        if out is not None:
            write_json_atomic(out, result.data)
        if store is not None:
            run_id = store.start_run(command, dataclasses.asdict(s) | {"func": "prune"}, provenance(loaded, data.files))
            record = pruned_engine_record(head_kind, head_reason, s.batch_size, machine, result.data)
            store.add_run_engine(run_id, record)
            store.add_pruning(run_id, task.name, s.pair if task.needs_pair else "", result.data)
        return result
    finally:
        if store is not None:
            store.close()


def pruned_engine_record(head: str, head_reason: str, batch_size: int, machine: dict, data: dict) -> dict:
    """prune's engines in the run record's form (``Store.add_run_engine``, the report's footer): the pruned
    engine (and the fast one where it decoded the masked check) with the measured head, on this machine."""
    fast = data.get("checked_by_fast_engine") or 0
    reasons = dict(
        engine="prune's full and pruned runs" + (f"; the fast engine decoded {fast} masked check(s)" if fast else ""),
        head=f"{head_reason}; the same in the full and the pruned runs",
        drafts="prune decodes without drafts",
        batch=f"{batch_size} requests a batch (--batch-size)",
    )
    return dict(engine="pruned", head=head, draft_tokens=0, batch_size=batch_size, reasons=reasons, hardware=machine)


def _kept(share: float) -> str:
    """The pruned score as a share of the full one; none where the full score is 0."""
    return "kept n/a: the full score is 0" if math.isnan(share) else f"kept {100 * share:.1f}%"


@dataclass
class PruneResult:
    data: dict = field(default_factory=dict)

    def table(self) -> str:
        d = self.data
        full, pr = d["full"], d["pruned"]

        def saved(a, b):
            return f"{100 * (1 - b / a):6.1f}%" if a else "   n/a"

        rows = [
            ("analytic GFLOP, prompts", full["gflop_prompt"], pr["gflop_prompt"]),
            ("analytic GFLOP, prompts + decoding", full["gflop_total"], pr["gflop_total"]),
            ("seconds, prompt processing", full["seconds_prefill"], pr["seconds_prefill"]),
            ("seconds, decoding", full["seconds_decode"], pr["seconds_decode"]),
            ("seconds, total", full["seconds"], pr["seconds"]),
            ("KV cache MB, largest batch", full["kv_mb_peak"], pr["kv_mb_peak"]),
            ("peak memory MB (" + d["memory_kind"] + ")", full["peak_memory_mb"], pr["peak_memory_mb"]),
        ]
        lines = [
            f"context-pruned inference: {d['condition']} processed up to layer r={d['from_layer']} of "
            f"{d['num_layers']}; {d['sentences']} requests, batch {d['batch_size']}, {d['device']} {d['dtype']}",
            f"{'':<38} {'full':>10} {'pruned':>10} {'saved':>8}",
        ]
        for name, a, b in rows:
            lines.append(f"{name:<38} {a:10.2f} {b:10.2f} {saved(a, b):>8}")
        lines.append(f"{d['metric']:<38} {full['score']:10.2f} {pr['score']:10.2f} ({_kept(d['quality_kept'])})")
        lines.append(
            f"memory at the start of each run: {full['memory_at_start_mb']:.0f} / {pr['memory_at_start_mb']:.0f} MB "
            "(the model and whatever the process held before)"
        )
        lines.append(f"paper's estimate (L-r)/L x k/(k+1): {100 * d['paper_estimate']:.1f}% of prompt compute")
        if d.get("head"):
            lines.append(f"LM head: {d['head']['kind']} ({d['head']['reason']})")
        if d.get("identical_to_masked") is not None:
            lines.append(
                f"pruned == masked-from-r: {d['identical_to_masked']}/{d['sentences']} generations "
                f"({d.get('checked_by_store', 0)} settled by the store's layer-sweep rows, "
                f"{d.get('checked_by_fast_engine', d['sentences'])} by the fast engine)"
            )
        return "\n".join(lines)


def measure_pruning(
    loaded: LoadedModel,
    task: Task,
    items: Sequence[PromptedItem],
    prompts: Sequence[MaskedPrompt],
    from_layer: int,
    k: int,
    score: Callable[[list[str]], float],
    stop: StopRule,
    pruned_engine: Callable[[], PrunedEngine],
    masked_engine: Engine | None = None,
    batch_size: int = 8,
    log=lambda msg: None,
    stored: Mapping[int, tuple[str, str]] | None = None,
) -> PruneResult:
    """Full processing vs context pruned at ``from_layer`` on the same requests: FLOPs, time, memory, quality.

    ``score`` maps the post-processed answers (in item order) to the task's metric; ``pruned_engine``
    makes a fresh engine per run (its counters are per run); ``masked_engine``, when given, decodes the
    same range masked from r, which pruning must equal, for every prompt ``stored`` lacks or disagrees
    with (``stored_masked``: a layer sweep's generations of the same prompts masked from r).
    """
    model = loaded.model
    assert model is not None  # a loaded model, not a description
    n_layers = loaded.info.num_layers
    condition = prompts[0].condition
    dims = ModelDims.of(model)
    cuda = str(loaded.info.device).startswith("cuda")
    sync = synchronizer(loaded.info.device)

    # Warm-up: one request each way, so that lazy initialisation is not timed.
    warm_up = StopRule(stop.stop_strings, 2)
    pruned_engine().generate_pruned(prompts[:1], from_layer, warm_up)
    pruned_engine().generate_pruned(prompts[:1], n_layers, warm_up)

    runs, decoded = {}, {}
    for name, r in (("full", n_layers), ("pruned", from_layer)):
        log(f"running {name} (context through {r} of {n_layers} layers) ...")
        engine = pruned_engine()
        return_free_memory(gpu_cache=False)  # each run's memory measured from what it needs, not what was kept
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        reset_peak_rss()
        at_start = torch.cuda.memory_allocated() / 2**20 if cuda else current_rss_mb()
        sync()
        started = time.perf_counter()
        gens = decoded[name] = engine.generate_pruned(prompts, r, stop)
        sync()
        seconds = time.perf_counter() - started
        peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else peak_rss_mb()
        flops = [_request_flops(dims, p, g, r) for p, g in zip(prompts, gens)]
        runs[name] = dict(
            from_layer=r,
            seconds=seconds,
            seconds_prefill=engine.stats["seconds_prefill"],
            seconds_decode=engine.stats["seconds_decode"],
            kv_mb_peak=engine.stats["kv_bytes_peak"] / 2**20,
            peak_memory_mb=peak if peak is not None else float("nan"),
            memory_at_start_mb=at_start if at_start is not None else float("nan"),
            gflop_prompt=sum(f["prompt"] for f in flops) / 1e9,
            gflop_total=sum(f["prompt"] + f["decode"] for f in flops) / 1e9,
            token_layers=engine.stats["token_layers"],
            score=score([post_process(task, g.text) for g in gens]),
            generations=[g.text for g in gens],
            token_ids=[g.token_ids for g in gens],
        )
        log(f"  {seconds:.1f}s")

    identical, checked_by = None, None
    if masked_engine is not None:
        identical, checked_by = check_masked(decoded["pruned"], prompts, from_layer, stop, masked_engine, stored, log)
    full, pruned = runs["full"], runs["pruned"]
    assert condition is not None  # pruning runs a condition's prompts
    data = dict(
        model=loaded.info.spec,
        device=loaded.info.device,
        dtype=loaded.info.dtype,
        condition=condition.name,
        from_layer=from_layer,
        num_layers=n_layers,
        k=k,
        sentences=len(items),
        batch_size=batch_size,
        metric=task.metric.name,
        memory_kind="GPU allocated" if cuda else "process RSS",
        full=full,
        pruned=pruned,
        flops_saved_prompt=1 - pruned["gflop_prompt"] / full["gflop_prompt"],
        flops_saved_total=1 - pruned["gflop_total"] / full["gflop_total"],
        time_saved_prefill=1 - pruned["seconds_prefill"] / full["seconds_prefill"],
        time_saved_total=1 - pruned["seconds"] / full["seconds"],
        kv_saved=1 - pruned["kv_mb_peak"] / full["kv_mb_peak"],
        quality_kept=pruned["score"] / full["score"] if full["score"] else float("nan"),
        paper_estimate=paper_savings(n_layers, from_layer, k),
        identical_to_masked=identical,
        checked_by_store=checked_by["store"] if checked_by else None,
        checked_by_fast_engine=checked_by["fast_engine"] if checked_by else None,
        threads=torch.get_num_threads(),
    )
    return PruneResult(data)


def stored_masked(
    store: Store, task: Task, condition: str, prompts: Sequence[MaskedPrompt], layer: int, stop: StopRule
) -> dict[int, tuple[str, str]]:
    """The (text, finish) of each prompt masked from ``layer`` as a layer sweep in ``store`` decoded it: the
    same task, condition and token limit, the very prompt tokens and hidden columns (model and dtype are
    the store's, checked when it was opened). Prompts the store lacks are left out."""
    if stop_rule(task, store.fingerprint().get("max_new_tokens")) != stop:  # the sweep's rule, as it ran
        return {}
    rows = store.predictions_at("mask", layer, dict(task=task.name, condition=condition))
    by_prompt = {
        (tuple(json.loads(row["prompt_token_ids"])), _ranges(json.loads(row["hidden_ranges"]))): (
            row["raw_generation"],
            row["finish"],
        )
        for row in rows
        if row["prompt_token_ids"] is not None and row["hidden_ranges"] is not None and row["finish"] is not None
    }
    found = ((i, by_prompt.get((tuple(p.ids), _ranges(p.hidden)))) for i, p in enumerate(prompts))
    return {i: g for i, g in found if g is not None}


def _ranges(ranges) -> tuple[tuple[int, int], ...]:
    return tuple((int(a), int(b)) for a, b in ranges)


def check_masked(
    pruned: Sequence[Generation],
    prompts: Sequence[MaskedPrompt],
    from_layer: int,
    stop: StopRule,
    masked_engine: Engine,
    stored: Mapping[int, tuple[str, str]] | None,
    log=lambda msg: None,
) -> tuple[int, dict[str, int]]:
    """How many pruned generations equal masking the same range from r, and by what each was settled: a
    stored sweep row with the same text and finish, else the masked engine's tokens (decoded here for
    the prompts without a stored row, and for any whose stored row differs: a sweep made on another
    machine may part at a rounding near-tie)."""
    agree = {i: row == (pruned[i].text, pruned[i].finish) for i, row in (stored or {}).items()}
    again = [i for i in range(len(prompts)) if not agree.get(i)]
    settled = len(prompts) - len(again)
    if settled:
        log(f"{settled} of {len(prompts)} equal to the store's layer-sweep rows masked from r")
    if again:
        log(f"checking {len(again)} against the fast engine masking the same range from r ...")
        fast = masked_engine.generate([prompts[i] for i in again], [MaskFrom(from_layer)], stop)
        agree |= {i: fast[(n, MaskFrom(from_layer))].token_ids == pruned[i].token_ids for n, i in enumerate(again)}
    return sum(agree.values()), dict(store=settled, fast_engine=len(again))


def _request_flops(dims: ModelDims, prompt: MaskedPrompt, gen: Generation, from_layer: int) -> dict[str, float]:
    """The analytic FLOPs of one pruned request (``costs.request_flops``)."""
    split = prune_split(prompt)
    return request_flops(dims, split.length, (split.start, split.end), _fed_back(gen), from_layer)


def _fed_back(gen: Generation) -> int:
    """Generated tokens that went back into the model: all produced tokens but the last."""
    produced = len(gen.token_ids) + (gen.finish == "eos")
    return max(0, produced - 1)
