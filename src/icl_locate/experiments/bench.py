"""``icl-locate bench``: the paper's way of running a layer sweep against the fast engine.

(a) paper: every (sentence, layer) re-encodes the full prompt and runs HF ``generate`` with
    batch 2, ``max_new_tokens=50`` and no stopping criterion (as the paper's code does);
(b) the same with our stopping rule (HF ``stop_strings``);
(c) the fast engine.
Generations of (a) are cut at the stop rule before comparing; (c) is compared with (b).
"""

from __future__ import annotations

import resource
import time
from dataclasses import dataclass

import torch

from ..core.conditions import MaskedPrompt, get_condition
from ..core.interventions import MaskFrom
from ..core.models import LoadedModel, load_model
from ..engines.base import StopRule, eos_ids, forward
from ..engines.paper import PaperEngine
from ..engines.reference import batch_interventions
from ..engines.sweep import SweepEngine
from ..tasks.registry import build_items
from ..util.fileio import check_writable, write_json_atomic
from ..util.progress import Progress
from ..util.system import peak_rss_mb, reset_peak_rss
from .common import check_context, masked_prompts, stop_rule, task_and_data
from .settings import ModelAndData, check_count, parse_layers


@dataclass(kw_only=True)
class BenchSettings(ModelAndData):
    pair: str = "fra-eng"
    condition: str = "instructions+examples"
    layers: str = "all"
    n_test: int = 8
    k: int = 5
    seed: int = 0
    batch_size: int | None = None
    skip_paper: bool = False
    json: str | None = None


def logit_margin(loaded: LoadedModel, prompt: MaskedPrompt, from_layer: int, common: list[int], a: int,
                 b: int) -> float:
    """|logit(a) - logit(b)| at the first differing position, by the reference forward."""
    interventions = batch_interventions(prompt, MaskFrom(from_layer), loaded.info.num_layers)
    ids = torch.tensor([prompt.ids + common], device=loaded.model.device)
    logits = forward(loaded.model, ids, interventions=interventions, last_only=True).logits[0, -1]
    return float((logits[a] - logits[b]).abs())


def matmul_gflops(device: str = "cpu", dtype: torch.dtype = torch.float32, size: int | None = None,
                  repeats: int = 10) -> float:
    """A plain torch matmul on the engine's device and dtype, for comparison."""
    size = size or (2048 if device == "cpu" else 8192)
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    sync = torch.cuda.synchronize if str(device).startswith("cuda") else (lambda: None)
    torch.mm(a, b)
    sync()
    started = time.perf_counter()
    for _ in range(repeats):
        torch.mm(a, b)
    sync()
    return 2 * size ** 3 * repeats / (time.perf_counter() - started) / 1e9


def engine_flops(model, stats: dict) -> float:
    """Matmul FLOPs of the fast engine's forwards: 2 x non-embedding params per token + logit rows."""
    emb = model.get_input_embeddings().weight
    params = sum(p.numel() for p in model.parameters()) - emb.numel()
    return 2.0 * params * stats["tokens_forwarded"] + 2.0 * emb.numel() * stats["logit_rows"]


@dataclass
class BenchResult:
    data: dict

    def table(self) -> str:
        d = self.data
        rows = [("(a) paper: full prompt, generate, batch 2, 50 tokens", d["seconds_paper"], 1.0),
                ("(b) paper + stop rule", d["seconds_paper_stop"], d["seconds_paper"] / d["seconds_paper_stop"]),
                ("(c) fast engine", d["seconds_fast"], d["speedup_vs_paper"])]
        lines = [f"{'method':<54} {'seconds':>9} {'speed-up vs (a)':>16}"]
        lines += [f"{name:<54} {sec:9.1f} {sp:15.1f}x" for name, sec, sp in rows]
        lines.append(f"fast vs (b): {d['speedup_vs_paper_stop']:.1f}x; identical generations "
                     f"{100 * d['identical_fraction']:.1f}% of {d['pairs']} (sentence, layer) pairs; "
                     f"{len(d['mismatches'])} mismatches")
        for m in d["mismatches"][:10]:
            lines.append(f"  mismatch sentence {m['sentence']} layer {m['from_layer']}: logit margin "
                         f"{m['logit_margin']:.4f} at new token {m['position']}")
        fast_peak = "n/a" if d.get("peak_rss_mb_fast") is None else f"{d['peak_rss_mb_fast']:.0f} MB"
        lines.append(f"peak RSS {d['peak_rss_mb']:.0f} MB (whole process), {fast_peak} during (c); fast engine {d['gflops_achieved']:.1f} GFLOP/s vs "
                     f"plain matmul {d['gflops_matmul_peak']:.1f} GFLOP/s")
        return "\n".join(lines)


def run_bench(s: BenchSettings, log=print) -> BenchResult:
    """Validate, load, run (a), (b), (c) on the same prompts and compare them."""
    condition = get_condition(s.condition)
    parse_layers(s.layers)
    check_count("--n-test", s.n_test)
    check_count("--batch-size", s.batch_size)
    if s.json:
        check_writable(s.json)
    task, data = task_and_data(s, s.pair, log)
    loaded = load_model(s.model, dtype=s.dtype, device=s.device)
    layers = parse_layers(s.layers, loaded.info.num_layers)
    items = build_items(task, data, loaded.tokenizer, k=s.k, seed=s.seed, n_test=s.n_test)
    stop = stop_rule(task)
    check_context(items, loaded, stop.max_new_tokens)
    log(f"bench: {loaded.info.spec} ({loaded.info.dtype}, {loaded.info.device}), {task.name} {data.label}, "
        f"{condition.name}, layers {layers[0]}..{layers[-1]} ({len(layers)}), {len(items)} sentences, k={s.k}")
    result = compare_methods(loaded, masked_prompts(items, condition), layers, stop, s.skip_paper, s.batch_size, log)
    if s.json:
        write_json_atomic(s.json, result.data)
    return result


def compare_methods(loaded: LoadedModel, prompts: list[MaskedPrompt], layers: list[int], stop: StopRule,
                    skip_paper: bool = False, batch_size: int | None = None, log=print) -> BenchResult:
    tok = loaded.tokenizer
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
    log("running (c) fast engine ...")
    reset_peak_rss()
    engine = SweepEngine(loaded.model, tok, batch_size=batch_size)
    started = time.perf_counter()
    fast = engine.generate(prompts, rows, stop)
    timings["fast"] = time.perf_counter() - started
    peak_fast = peak_rss_mb()
    log(f"  {timings['fast']:.1f}s")

    identical, mismatches, paper_vs_stop = 0, [], 0
    for i, prompt in enumerate(prompts):
        for row in rows:
            b = stop.cut(tok, eos, results["paper_stop"][(i, row)])
            c = fast[(i, row)].token_ids
            if "paper" in results:
                paper_vs_stop += stop.cut(tok, eos, results["paper"][(i, row)]) == b
            if b == c:
                identical += 1
                continue
            k = next((p for p, (x, y) in enumerate(zip(b, c)) if x != y), min(len(b), len(c)))
            if k < len(b) and k < len(c):
                margin = logit_margin(loaded, prompt, row.layer, c[:k], b[k], c[k])
            else:
                margin = float("nan")  # one is a prefix of the other: they differ on stopping, not a token
            mismatches.append(dict(sentence=i, from_layer=row.layer, position=k, logit_margin=margin,
                                   paper_stop=tok.decode(b), fast=tok.decode(c)))
    pairs = len(prompts) * len(layers)
    seconds_paper = timings.get("paper", float("nan"))
    data = dict(
        model=loaded.info.spec, device=loaded.info.device, dtype=loaded.info.dtype,
        condition=prompts[0].condition.name if prompts[0].condition else "baseline",
        layers=list(layers), sentences=len(prompts), pairs=pairs,
        seconds_paper=seconds_paper, seconds_paper_stop=timings["paper_stop"], seconds_fast=timings["fast"],
        speedup_vs_paper=seconds_paper / timings["fast"], speedup_vs_paper_stop=timings["paper_stop"] / timings["fast"],
        identical_fraction=identical / pairs, paper_cut_equals_paper_stop=paper_vs_stop / pairs if "paper" in results
        else None, mismatches=mismatches,
        peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, peak_rss_mb_fast=peak_fast,
        gflops_achieved=engine_flops(loaded.model, engine.stats) / timings["fast"] / 1e9,
        gflops_matmul_peak=matmul_gflops(loaded.info.device, next(loaded.model.parameters()).dtype),
        engine_stats=engine.stats, threads=torch.get_num_threads())
    return BenchResult(data)
