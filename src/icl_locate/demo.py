"""The README's main job: a small but real layer sweep on the embedded Gemma-3-270M, fra->eng."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from .errors import UserError

DEMO_CONDITIONS = ("instructions+examples", "examples")


def run_demo(args) -> int:
    from .cli import write_jsonl_atomic
    from .engine import predict
    from .masking import get_condition
    from .metrics import translation_scores
    from .models import EMBEDDED, load_model
    from .tasks import TaskOptions, build_items, get_task

    out_dir = Path(args.out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"cannot create {out_dir}: {err.strerror}") from None
    started = time.time()
    task = get_task("flores")
    data = task.load(TaskOptions(data_dir=args.data_dir, pair="fra-eng"))
    loaded = load_model(EMBEDDED)
    n_layers = loaded.info.num_layers
    items = build_items(task, data, loaded.tokenizer, k=5, seed=0, n_test=args.n_test)
    layers = list(range(0, n_layers + 1, 3)) + ([n_layers] if n_layers % 3 else [])
    rows, table = [], []
    runs = [("baseline", n_layers)] + [(c, j) for c in DEMO_CONDITIONS for j in layers if j < n_layers]
    for i, (cond_name, layer) in enumerate(runs, 1):
        cond = get_condition(cond_name)
        preds = predict(loaded, task, items, cond, layer)
        scores = translation_scores([p.generation for p in preds], [p.reference for p in preds])
        table.append((cond_name, layer, scores.bleu, scores.chrf))
        rows += [dict(vars(p), sentence_bleu=b) for p, b in zip(preds, scores.sentence_bleu)]
        print(f"[{i}/{len(runs)}] {cond_name:<22} from layer {layer:>2}: BLEU {scores.bleu:5.1f}  chrF "
              f"{scores.chrf:5.1f}  ({time.time() - started:.0f}s)", file=sys.stderr, flush=True)
    write_jsonl_atomic(out_dir / "predictions.jsonl", rows)
    summary = [dict(condition=c, from_layer=j, bleu=b, chrf=f) for c, j, b, f in table]
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    print(f"\nGemma-3-270M fra->eng, 5-shot, {len(items)} devtest sentences ({time.time() - started:.0f}s)")
    print(f"{'condition':<24} {'from layer':>10} {'BLEU':>6} {'chrF':>6}")
    for c, j, b, f in table:
        print(f"{c:<24} {j:>10} {b:6.1f} {f:6.1f}")
    print(f"results: {out_dir}/predictions.jsonl, {out_dir}/summary.json")
    return 0
