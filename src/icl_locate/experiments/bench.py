"""``icl-locate bench``: the paper's way of running a layer sweep against our engines.

(a) paper: every (sentence, layer) re-encodes the full prompt and runs HF ``generate`` with
    batch 2, ``max_new_tokens=50`` and no stopping criterion (as the paper's code does);
(b) the same with our stopping rule (HF ``stop_strings``);
(c) the fast engine (``engines/fast.py``);
(d) the engine configuration chosen for this machine (``engines/calibrate.py``: by default the tree
    engine, ``engines/tree.py``, with the LM head and drafts measured fastest here; flags force them).
Generations of (a) are cut at the stop rule before comparing; (c) and (d) are compared with (b).
The JSON keys of (d) end in ``_spec`` (the engine configuration chosen for this machine), those of (c)
in ``_fast``.

FLOPs per row are analytic (``core/costs.py``): 2 x parameters for every token a layer runs and every row the LM head
scores (attention over the cache left out, for all methods alike).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

import torch

from ..core.conditions import MaskedPrompt
from ..core.costs import ModelDims, weight_flops
from ..core.interventions import MaskFrom
from ..core.models import LoadedModel, load_model
from ..engines.base import StopRule, eos_ids, forward, time_breakdown
from ..engines.calibrate import Calibrator, build_engine
from ..engines.choices import Choices
from ..engines.fast import FastEngine
from ..engines.paper import PaperEngine
from ..engines.reference import batch_interventions
from ..engines.request import AUTO_REQUEST, EngineRequest, parse_draft_tokens
from ..engines.timing import synchronizer
from ..tasks.items import build_items
from ..util.fileio import check_writable, write_json_atomic
from ..util.progress import Progress
from ..util.system import peak_rss_mb, process_peak_mb, reset_peak_rss, return_free_memory
from .common import check_context, layer_from_condition, masked_prompts, stop_rule
from .options import BenchSettings
from .settings import check_count, parse_layers, task_and_data


def logit_margin(
    loaded: LoadedModel, prompt: MaskedPrompt, from_layer: int, common: list[int], a: int, b: int
) -> float:
    """|logit(a) - logit(b)| at the first differing position, by the reference forward."""
    assert loaded.model is not None  # a loaded model, not a description
    interventions = batch_interventions(prompt, MaskFrom(from_layer), loaded.info.num_layers)
    ids = torch.tensor([prompt.ids + common], device=loaded.model.device)  # pyright: ignore[reportArgumentType]
    logits = forward(loaded.model, ids, interventions=interventions, last_only=True).logits[0, -1]
    return float((logits[a] - logits[b]).abs())


def matmul_gflops(
    device: str = "cpu", dtype: torch.dtype = torch.float32, size: int | None = None, repeats: int = 10
) -> float:
    """A plain torch matmul on the engine's device and dtype, for comparison."""
    size = size or (2048 if device == "cpu" else 8192)
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    sync = synchronizer(device)
    torch.mm(a, b)
    sync()
    started = time.perf_counter()
    for _ in range(repeats):
        torch.mm(a, b)
    sync()
    return 2 * size**3 * repeats / (time.perf_counter() - started) / 1e9


def paper_flops(
    dims: ModelDims, prompts: list[MaskedPrompt], n_rows: int, max_new_tokens: int, batch_size: int = 2
) -> float:
    """(a): per layer setting and batch of 2, the padded prompt plus max_new - 1 decoding steps
    through every layer, and one head row per generated token (``generate`` keeps the last position)."""
    tokens = rows = 0
    for start in range(0, len(prompts), batch_size):
        batch = prompts[start : start + batch_size]
        tokens += len(batch) * (max(len(p.ids) for p in batch) + max_new_tokens - 1)
        rows += len(batch) * max_new_tokens
    return n_rows * weight_flops(dims, [tokens] * len(dims.layer_params), rows)


@dataclass
class BenchResult:
    data: dict

    def table(self) -> str:
        d = self.data
        rows = [
            ("(a) paper: full prompt, generate, batch 2, 50 tokens", d["seconds_paper"]),
            ("(b) paper + stop rule", d["seconds_paper_stop"]),
            ("(c) fast engine", d["seconds_fast"]),
            (f"(d) {d.get('engine_spec', 'tree engine')}", d["seconds_spec"]),
        ]
        skipped = math.isnan(d["seconds_paper"])  # --skip-paper: speed-ups against (b) instead
        base, base_name = (d["seconds_paper_stop"], "(b)") if skipped else (d["seconds_paper"], "(a)")
        lines = [f"{'method':<54} {'seconds':>9} {f'speed-up vs {base_name}':>16} {'GFLOP/row':>10}"]
        per_row = [d["flops_per_row_paper"], None, d["flops_per_row_fast"], d["flops_per_row_spec"]]
        for (name, sec), flops in zip(rows, per_row):
            gflops = "" if flops is None else f"{flops / 1e9:10.2f}"
            timed = f"{'skipped':>9} {'':>16}" if math.isnan(sec) else f"{sec:9.1f} {base / sec:15.1f}x"
            lines.append(f"{name:<54} {timed} {gflops}")
        for label, key in (("(c)", "identical_fraction"), ("(d)", "identical_fraction_spec")):
            found = d["mismatches" if label == "(c)" else "mismatches_spec"]
            lines.append(
                f"{label} vs (b): identical generations {100 * d[key]:.1f}% of {d['pairs']} (sentence, layer) "
                f"pairs; {len(found)} mismatches"
            )
            for m in found[:10]:
                lines.append(
                    f"  mismatch sentence {m['sentence']} layer {m['from_layer']}: logit margin "
                    f"{m['logit_margin']:.4f} at new token {m['position']}"
                )
        drafts = (
            "no drafts"
            if not d["draft_tokens"]
            else f"drafts of <= {d['draft_tokens']} tokens, "
            f"{100 * (d['acceptance_rate'] or 0):.0f}% of draft tokens accepted"
        )
        lines.append(f"(d) vs fast: {d['speedup_spec_vs_fast']:.2f}x; (d) head: {d['head_spec']}; {drafts}")
        for label, key in (("(c)", "time_breakdown_fast"), ("(d)", "time_breakdown_spec")):
            t = d[key]
            lines.append(
                f"{label} seconds: context {t['prefix']:.1f}, query prefill {t['query_prefill']:.1f}, "
                f"decoding {t['decode_forward']:.1f}, verifying drafts {t['verification']:.1f}; of the "
                f"forwards LM head {t['head']:.1f}, body "
                f"{t['body']:.1f}; bookkeeping {t['bookkeeping']:.1f}"
            )
        fast_peak = "n/a" if d.get("peak_rss_mb_fast") is None else f"{d['peak_rss_mb_fast']:.0f} MB"
        spec_peak = "n/a" if d.get("peak_rss_mb_spec") is None else f"{d['peak_rss_mb_spec']:.0f} MB"
        lines.append(
            f"peak RSS {d['peak_rss_mb']:.0f} MB (whole process), {fast_peak} during (c), {spec_peak} during "
            f"(d); fast engine {d['gflops_achieved']:.1f} GFLOP/s vs plain matmul "
            f"{d['gflops_matmul_peak']:.1f} GFLOP/s"
        )
        if d.get("hardware"):
            lines.append(f"(d) chosen here: {Choices.from_dict(d['hardware']['choices']).line()}")
        return "\n".join(lines)


def run_bench(s: BenchSettings, log=print) -> BenchResult:
    """Validate, load, run (a) to (d) on the same prompts and compare them."""
    condition = layer_from_condition(s.condition, "bench")
    parse_layers(s.layers)
    check_count("--n-test", s.n_test)
    check_count("--batch-size", s.batch_size)
    request = EngineRequest(s.engine, s.head, parse_draft_tokens(s.draft_tokens), s.batch_size)
    request.check()
    if s.json:
        check_writable(s.json)
    task, data = task_and_data(s, s.pair, log)
    loaded = load_model(s.model, dtype=s.dtype, device=s.device)
    layers = parse_layers(s.layers, loaded.info.num_layers)
    items = build_items(task, data, loaded.tokenizer, k=s.k, seed=s.seed, n_test=s.n_test)
    stop = stop_rule(task)
    check_context(items, loaded, stop.max_new_tokens)
    log(
        f"bench: {loaded.info.spec} ({loaded.info.dtype}, {loaded.info.device}), {task.name} {data.label}, "
        f"{condition.name}, layers {layers[0]}..{layers[-1]} ({len(layers)}), {len(items)} sentences, k={s.k}"
    )
    result = compare_methods(loaded, masked_prompts(items, condition), layers, stop, s.skip_paper, log, request)
    if s.json:
        write_json_atomic(s.json, result.data)
    return result


def compare_methods(
    loaded: LoadedModel,
    prompts: list[MaskedPrompt],
    layers: list[int],
    stop: StopRule,
    skip_paper: bool = False,
    log=print,
    request: EngineRequest = AUTO_REQUEST,
) -> BenchResult:
    assert loaded.model is not None  # a loaded model, not a description
    tok: Any = loaded.tokenizer
    eos = eos_ids(loaded.model, tok)
    rows = [MaskFrom(j) for j in layers]
    paper = PaperEngine(loaded.model, tok)
    timings, results = {}, {}
    for name, rule in (("paper", None), ("paper_stop", stop)):
        if skip_paper and name == "paper":
            continue
        log(f"running ({'a' if name == 'paper' else 'b'}) {name} ...")
        with Progress(len(prompts) * len(rows), name) as progress:
            started = time.perf_counter()
            results[name] = paper.generate_ids(prompts, rows, stop.max_new_tokens, rule, progress.inner(name))
            timings[name] = time.perf_counter() - started
        log(f"  {timings[name]:.1f}s")
    calibrator = Calibrator(loaded.model, tok, request)
    choices = calibrator.choose(prompts, rows, stop, loaded.info.as_dict())
    log(choices.line())
    engines = {
        "fast": FastEngine(loaded.model, tok, batch_size=request.batch_size),
        "spec": build_engine(loaded.model, tok, choices, calibrator),
    }
    outputs, peaks = {}, {}
    before = peak_rss_mb()  # the process's peak so far (model, (a), (b), calibration): the resets below clear it
    for name, engine in engines.items():
        log(f"running ({'c' if name == 'fast' else 'd'}) {'fast engine' if name == 'fast' else choices.summary()} ...")
        # each engine's peak from what the process holds, not what earlier phases freed
        return_free_memory(gpu_cache=False)
        reset_peak_rss()
        started = time.perf_counter()
        outputs[name] = engine.generate(prompts, rows, stop)
        timings[name] = time.perf_counter() - started
        peaks[name] = peak_rss_mb()
        log(f"  {timings[name]:.1f}s")

    def compare(generated, label: str) -> tuple[int, list[dict]]:
        identical, mismatches = 0, []
        for i, prompt in enumerate(prompts):
            for row in rows:
                b = stop.cut(tok, eos, results["paper_stop"][(i, row)])
                c = generated[(i, row)].token_ids
                if b == c:
                    identical += 1
                    continue
                k = next((p for p, (x, y) in enumerate(zip(b, c)) if x != y), min(len(b), len(c)))
                if k < len(b) and k < len(c):
                    margin = logit_margin(loaded, prompt, row.layer, c[:k], b[k], c[k])
                else:
                    margin = float("nan")  # one is a prefix of the other: they differ on stopping, not a token
                mismatches.append(
                    dict(
                        sentence=i,
                        from_layer=row.layer,
                        position=k,
                        logit_margin=margin,
                        paper_stop=tok.decode(b),
                        **{label: tok.decode(c)},
                    )
                )
        return identical, mismatches

    identical, mismatches = compare(outputs["fast"], "fast")
    identical_spec, mismatches_spec = compare(outputs["spec"], "spec")
    paper_vs_stop = (
        sum(
            stop.cut(tok, eos, results["paper"][key]) == stop.cut(tok, eos, results["paper_stop"][key])
            for key in results["paper_stop"]
        )
        if "paper" in results
        else None
    )
    pairs = len(prompts) * len(layers)
    seconds_paper = timings.get("paper", float("nan"))
    fast, spec = engines["fast"], engines["spec"]
    n_layers = loaded.info.num_layers
    dims = ModelDims.of(loaded.model)
    flops_fast = weight_flops(dims, [fast.stats["tokens_forwarded"]] * n_layers, fast.stats["logit_rows"])
    layer_tokens = spec.stats.get("slot_tokens") or [spec.stats["tokens_forwarded"]] * n_layers
    flops_spec = weight_flops(
        dims,
        [t + spec.stats["prefix_tokens"] for t in layer_tokens],
        spec.stats["logit_rows"],  # prefix caches are made without the LM head
    )
    data = dict(
        model=loaded.info.spec,
        device=loaded.info.device,
        dtype=loaded.info.dtype,
        condition=prompts[0].condition.name if prompts[0].condition else "baseline",
        layers=list(layers),
        sentences=len(prompts),
        pairs=pairs,
        seconds_paper=seconds_paper,
        seconds_paper_stop=timings["paper_stop"],
        seconds_fast=timings["fast"],
        speedup_vs_paper=seconds_paper / timings["fast"],
        speedup_vs_paper_stop=timings["paper_stop"] / timings["fast"],
        identical_fraction=identical / pairs,
        paper_cut_equals_paper_stop=None if paper_vs_stop is None else paper_vs_stop / pairs,
        mismatches=mismatches,
        seconds_spec=timings["spec"],
        speedup_spec_vs_paper=seconds_paper / timings["spec"],
        speedup_spec_vs_fast=timings["fast"] / timings["spec"],
        identical_fraction_spec=identical_spec / pairs,
        mismatches_spec=mismatches_spec,
        draft_tokens=choices.draft_tokens,
        acceptance_rate=spec.stats.get("draft_accepted", 0) / spec.stats["draft_tokens"]
        if spec.stats.get("draft_tokens")
        else None,
        flops_per_row_paper=paper_flops(dims, prompts, len(rows), stop.max_new_tokens) / pairs,
        flops_per_row_fast=flops_fast / pairs,
        flops_per_row_spec=flops_spec / pairs,
        time_breakdown_fast=time_breakdown(fast.times),
        time_breakdown_spec=time_breakdown(spec.times),
        engine_spec=choices.summary(),
        head_spec=getattr(spec, "head_note", "the model's own LM head"),
        head_screen_stats=spec.head.stats if getattr(spec, "head", None) is not None else None,
        hardware=dict(choices.hardware, choices=choices.as_dict()),
        peak_rss_mb=process_peak_mb([before, *peaks.values(), peak_rss_mb()]),  # the last: (d) and after
        peak_rss_mb_fast=peaks["fast"],
        peak_rss_mb_spec=peaks["spec"],
        gflops_achieved=flops_fast / timings["fast"] / 1e9,
        gflops_matmul_peak=matmul_gflops(loaded.info.device, next(loaded.model.parameters()).dtype),
        engine_stats=fast.stats,
        engine_stats_spec=spec.stats,
        threads=torch.get_num_threads(),
    )
    return BenchResult(data)
