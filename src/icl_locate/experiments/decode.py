"""``icl-locate run``: decode a test set under one condition masked from one layer (reference engine), score it."""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path

from ..core.conditions import get_condition
from ..core.interventions import mask_row
from ..core.models import load_model
from ..engines.reference import ReferenceEngine
from ..tasks.items import build_items, check_label_variant, labelled_task, post_process
from ..tasks.metrics import PassAt1
from ..util.errors import UserError
from ..util.fileio import check_writable, write_jsonl_atomic
from ..util.progress import Progress
from .common import check_context, masked_prompts, stop_rule
from .options import RunSettings
from .settings import check_count, task_and_data


@dataclass
class RunResult:
    description: str
    rows: list[dict]
    summary: str
    seconds: float
    out: Path | None = None
    metric: str = ""


def run_decode(s: RunSettings, log=print) -> RunResult:
    condition = get_condition(s.condition)
    check_count("--max-new-tokens", s.max_new_tokens)
    out = check_writable(s.out) if s.out else None
    task, data = task_and_data(s, s.pair, log)
    check_label_variant(task, s.labels)
    if isinstance(task.metric, PassAt1):
        task = dataclasses.replace(task, metric=dataclasses.replace(task.metric, workers=s.workers, timeout=s.timeout))
    loaded = load_model(s.model, dtype=s.dtype, device=s.device)
    assert loaded.model is not None  # load_model always loads the weights
    n_layers = loaded.info.num_layers
    from_layer = n_layers if s.from_layer is None and condition.name == "baseline" else s.from_layer
    if from_layer is None:
        raise UserError(f"--from-layer is required for condition {condition.name} (0..{n_layers})")
    if not 0 <= from_layer <= n_layers:
        raise UserError(f"--from-layer must be in 0..{n_layers} for {loaded.info.spec}, got {from_layer}")
    items = build_items(
        task,
        data,
        loaded.tokenizer,
        k=s.k,
        seed=s.seed,
        n_test=s.n_test,
        instructions=s.instructions,
        per_query_examples=s.per_query_examples,
        labels=s.labels,
    )
    task = labelled_task(task, data, s.labels, s.seed)
    stop = stop_rule(task, s.max_new_tokens)
    check_context(items, loaded, stop.max_new_tokens)
    description = (
        f"{loaded.info.spec}: {loaded.info.architecture}, {n_layers} layers, {loaded.info.dtype} on "
        f"{loaded.info.device} | task {task.name} {data.label} | condition {condition.name} {condition.window} layer "
        f"{from_layer} | k={s.k} seed={s.seed} {s.labels} labels | {len(items)} test items"
    )
    prompts = masked_prompts(items, condition)
    row = mask_row(condition, from_layer)
    started = time.time()
    with Progress(len(prompts), "decoding") as progress:
        gens = ReferenceEngine(loaded.model, loaded.tokenizer).generate(
            prompts, [row], stop, lambda done, total: progress.advance(items[done - 1].item.id)
        )
    seconds = time.time() - started
    masked = from_layer < n_layers
    rows = []
    for i, (it, prompt) in enumerate(zip(items, prompts)):
        g = gens[(i, row)]
        ranges = list(prompt.hidden) if masked else []
        rows.append(
            dict(
                example_id=it.item.id,
                condition=condition.name,
                from_layer=from_layer,
                prompt=prompt.encoded.text,
                prompt_token_ids=list(prompt.ids),
                masked_token_ranges=[list(r) for r in ranges],
                masked_layers=list(range(from_layer, n_layers)) if ranges else [],
                raw_generation=g.text,
                generation=post_process(task, g.text),
                reference=it.item.target,
                finish=g.finish,
                in_context_example_ids=list(it.encoded.example_ids),
                model=loaded.info.spec,
                task=task.name,
                data=data.label,
                seed=s.seed,
                k=s.k,
                instructions=s.instructions,
            )
        )
    scored = task.metric.score([r["generation"] for r in rows], [it.item for it in items], data)
    for r, score, details in zip(rows, scored.sentence, scored.details):
        r.update(details, sentence_score=score)
    if out is not None:
        write_jsonl_atomic(out, rows)
    return RunResult(description, rows, scored.summary, seconds, out, task.metric.name)
