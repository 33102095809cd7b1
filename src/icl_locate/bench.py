"""``icl-locate bench``: the paper's way of running a layer sweep against the fast engine.

(a) paper: every (sentence, layer) re-encodes the full prompt and runs HF ``generate`` with
    batch 2, ``max_new_tokens=50`` and no stopping criterion (as the paper's code does);
(b) the same with our stopping rule (HF ``stop_strings``);
(c) the fast engine.
Generations of (a) are cut at the stop rule before comparing; (c) is compared with (b).
"""

from __future__ import annotations

import resource
import sys
import time
from dataclasses import dataclass

import torch

from .engine import forward, plan_for_prompt
from .fast_engine import SweepEngine, Variant
from .masking import MaskPlan, hidden_ranges


def cut_at_stop(tokenizer, token_ids: list[int], stop_strings, eos: set[int]) -> list[int]:
    """Tokens up to EOS or up to (and including) the token that completes a stop string."""
    out = []
    for t in token_ids:
        if t in eos:
            break
        out.append(t)
        if stop_strings and any(s in tokenizer.decode(out) for s in stop_strings):
            break
    return out


def paper_method(loaded, items, condition, layers, stop_strings=None, batch_size=2, max_new_tokens=50):
    """The paper's loop: per layer, batches of 2 full prompts through ``model.generate``."""
    from transformers import DynamicCache

    model, tok = loaded.model, loaded.tokenizer
    n = loaded.info.num_layers
    out = {}
    for j in layers:
        for start in range(0, len(items), batch_size):
            batch = items[start:start + batch_size]
            width = max(len(it.encoded.ids) for it in batch)
            ids = torch.full((len(batch), width), tok.pad_token_id, dtype=torch.long)
            mask = torch.zeros_like(ids)
            hidden, pads = [], []
            for b, it in enumerate(batch):
                pad = width - len(it.encoded.ids)
                ids[b, pad:] = torch.tensor(it.encoded.ids)
                mask[b, pad:] = 1
                pads.append(pad)
                ranges = hidden_ranges(condition, it.encoded.spans, len(it.encoded.ids)) if j < n else []
                hidden.append(ranges)
            plan = MaskPlan.from_layer(hidden, j, n).shifted(pads)
            kwargs = dict(max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id,
                          cache=DynamicCache())
            if stop_strings:
                kwargs.update(stop_strings=list(stop_strings), tokenizer=tok)
            from .masking import apply_plan

            with torch.no_grad(), apply_plan(model, plan):
                seqs = model.generate(ids.to(model.device), attention_mask=mask.to(model.device), **kwargs)
            for b, it in enumerate(batch):
                out[(start + b, j)] = seqs[b, width:].tolist()
    return out


def logit_margin(loaded, item, condition, from_layer, common: list[int], a: int, b: int) -> float:
    """|logit(a) - logit(b)| at the first differing position, by the reference forward."""
    n = loaded.info.num_layers
    ranges = hidden_ranges(condition, item.encoded.spans, len(item.encoded.ids)) if from_layer < n else []
    plan = plan_for_prompt(ranges, layers=range(from_layer, n) if ranges else ())
    ids = torch.tensor([item.encoded.ids + common], device=loaded.model.device)
    logits = forward(loaded.model, ids, plan=plan, last_only=True).logits[0, -1]
    return float((logits[a] - logits[b]).abs())


def reset_peak_rss() -> None:
    """Linux: reset the process's peak resident set size (VmHWM), so a phase can be measured alone."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def peak_rss_mb() -> float | None:
    """Peak resident set size since the last reset (Linux VmHWM), in MB."""
    return _proc_status_mb("VmHWM:")


def current_rss_mb() -> float | None:
    """Resident set size now (Linux VmRSS), in MB."""
    return _proc_status_mb("VmRSS:")


def _proc_status_mb(field: str) -> float | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


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


def run_bench(loaded, task, items, condition, layers, skip_paper: bool = False, batch_size=None,
              log=lambda msg: print(msg, file=sys.stderr, flush=True)) -> BenchResult:
    from .engine import eos_ids

    tok = loaded.tokenizer
    eos = eos_ids(loaded.model, tok)
    stop = task.stop_strings
    timings = {}
    results = {}
    for name, kwargs in (("paper", dict(stop_strings=None)), ("paper_stop", dict(stop_strings=stop))):
        if skip_paper and name == "paper":
            continue
        log(f"running ({'a' if name == 'paper' else 'b'}) {name} ...")
        started = time.perf_counter()
        results[name] = paper_method(loaded, items, condition, layers, max_new_tokens=task.max_new_tokens, **kwargs)
        timings[name] = time.perf_counter() - started
        log(f"  {timings[name]:.1f}s")
    log("running (c) fast engine ...")
    reset_peak_rss()
    engine = SweepEngine(loaded.model, tok, batch_size=batch_size)
    started = time.perf_counter()
    fast = engine.generate([it.encoded for it in items], condition, [Variant(from_layer=j) for j in layers],
                           stop_strings=stop, max_new_tokens=task.max_new_tokens)
    timings["fast"] = time.perf_counter() - started
    peak_fast = peak_rss_mb()
    log(f"  {timings['fast']:.1f}s")

    identical, mismatches, paper_vs_stop = 0, [], 0
    for i, item in enumerate(items):
        for j in layers:
            b = cut_at_stop(tok, results["paper_stop"][(i, j)], stop, eos)
            c = fast[(i, Variant(from_layer=j))].token_ids
            if "paper" in results:
                a = cut_at_stop(tok, results["paper"][(i, j)], stop, eos)
                paper_vs_stop += a == b
            if b == c:
                identical += 1
                continue
            k = next((p for p, (x, y) in enumerate(zip(b, c)) if x != y), min(len(b), len(c)))
            if k < len(b) and k < len(c):
                margin = logit_margin(loaded, item, condition, j, c[:k], b[k], c[k])
            else:
                margin = float("nan")  # one is a prefix of the other: they differ on stopping, not a token
            mismatches.append(dict(sentence=i, from_layer=j, position=k, logit_margin=margin,
                                   paper_stop=tok.decode(b), fast=tok.decode(c)))
    pairs = len(items) * len(layers)
    seconds_paper = timings.get("paper", float("nan"))
    data = dict(
        model=loaded.info.spec, device=loaded.info.device, dtype=loaded.info.dtype, condition=condition.name,
        layers=list(layers), sentences=len(items), pairs=pairs,
        seconds_paper=seconds_paper, seconds_paper_stop=timings["paper_stop"], seconds_fast=timings["fast"],
        speedup_vs_paper=seconds_paper / timings["fast"], speedup_vs_paper_stop=timings["paper_stop"] / timings["fast"],
        identical_fraction=identical / pairs, paper_cut_equals_paper_stop=paper_vs_stop / pairs if "paper" in results
        else None, mismatches=mismatches,
        peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, peak_rss_mb_fast=peak_fast,
        gflops_achieved=engine_flops(loaded.model, engine.stats) / timings["fast"] / 1e9,
        gflops_matmul_peak=matmul_gflops(loaded.info.device, next(loaded.model.parameters()).dtype),
        engine_stats=engine.stats, threads=torch.get_num_threads())
    return BenchResult(data)
