"""Paper-grid sweeps: plan a grid of work units, then execute them into a results store.

Planning (``plan_units``) is pure: a config becomes a list of ``WorkUnit``s with stable ids, so
units can be handed to any executor. A unit = one (task, pair, condition or layer ablation,
instructions on/off, seed, k) over all requested layers and test items; the fast engine
decodes its (item, layer) rows together, and the store commits it in one transaction.
"""

from __future__ import annotations

import hashlib
import json
import platform
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Callable

import yaml

from .errors import UserError

MT_PAIRS = ["eng-fra", "fra-eng", "eng-por", "por-eng"]
PAPER_CONDITIONS = ["instructions+examples", "examples", "query", "instructions+examples+query", "all-but-last"]


@dataclass
class SweepConfig:
    model: str = "gemma-3-270m"
    task: str = "flores"
    pairs: list[str] = field(default_factory=lambda: ["fra-eng"])
    conditions: list[str] = field(default_factory=lambda: ["instructions+examples"])
    instructions: list[bool] = field(default_factory=lambda: [True])
    seeds: list[int] = field(default_factory=lambda: [0])
    ks: list[int] = field(default_factory=lambda: [5])
    layers: str = "all"  # "all" = 0..L, or "0,4,8"
    layer_ablation: bool = False  # also run one unit per (pair, seed, k) ablating each layer's attention
    n_test: int | None = None  # None = the whole test set
    max_new_tokens: int | None = None  # None = the task's
    batch_size: int | None = None
    data_dir: str | None = None
    dtype: str | None = None
    device: str | None = None


PRESETS: dict[str, dict] = {
    "paper-mt": dict(task="flores", pairs=MT_PAIRS, conditions=PAPER_CONDITIONS, instructions=[True, False],
                     seeds=[0, 1, 2], ks=[5]),
    "paper-code": dict(task="humaneval", pairs=[""], conditions=PAPER_CONDITIONS, instructions=[True, False],
                       seeds=[0, 1, 2], ks=[5]),
    "paper-n-examples": dict(task="flores", pairs=MT_PAIRS, conditions=["instructions+examples"],
                             instructions=[True], seeds=[0, 1, 2], ks=[0, 1, 2, 5, 10]),
    "paper-layer-ablation": dict(task="flores", pairs=MT_PAIRS, conditions=[], instructions=[True],
                                 seeds=[0, 1, 2], ks=[5], layer_ablation=True),
}


def load_config(preset: str | None = None, yaml_path: str | None = None, overrides: dict | None = None) -> SweepConfig:
    """Preset, then YAML file, then command-line overrides (None values ignored)."""
    values: dict = {}
    if preset:
        if preset not in PRESETS:
            raise UserError(f"unknown preset {preset!r}; available: {', '.join(PRESETS)}")
        values.update(PRESETS[preset])
    if yaml_path:
        try:
            loaded = yaml.safe_load(Path(yaml_path).read_text()) or {}
        except OSError as err:
            raise UserError(f"cannot read {yaml_path}: {err.strerror}") from None
        except yaml.YAMLError as err:
            raise UserError(f"{yaml_path} is not valid YAML: {str(err).splitlines()[0]}") from None
        if not isinstance(loaded, dict):
            raise UserError(f"{yaml_path} must hold a mapping of sweep settings")
        values.update(loaded)
    values.update({k: v for k, v in (overrides or {}).items() if v is not None})
    known = {f.name for f in fields(SweepConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise UserError(f"unknown sweep setting(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    return SweepConfig(**values)


@dataclass(frozen=True)
class WorkUnit:
    task: str
    pair: str
    kind: str  # "mask" or "ablation"
    condition: str  # masking condition ("" for ablation)
    instructions: bool
    seed: int
    k: int
    n_test: int | None
    layers: tuple[int, ...]

    @property
    def unit_id(self) -> str:
        return hashlib.sha1(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:16]

    def label(self) -> str:
        what = self.condition if self.kind == "mask" else "layer ablation"
        return (f"{self.task} {self.pair or ''} {what} {'instr' if self.instructions else 'no-instr'} "
                f"seed={self.seed} k={self.k}").replace("  ", " ")


def plan_units(config: SweepConfig, num_layers: int) -> list[WorkUnit]:
    """Expand the grid. Validates names so that bad input fails before any model work."""
    from .cli import parse_layers
    from .masking import get_condition
    from .tasks import get_task

    get_task(config.task)
    for c in config.conditions:
        get_condition(c)
    if not config.conditions and not config.layer_ablation:
        raise UserError("nothing to run: no conditions and no layer ablation")
    if any(k < 0 for k in config.ks):
        raise UserError("k must be >= 0")
    layers = tuple(parse_layers(config.layers, num_layers))
    pairs = config.pairs if get_task(config.task).needs_pair else [""]  # pairs only mean something for MT
    if not pairs:
        raise UserError(f"task {config.task} needs at least one language pair (--pairs)")
    units = []
    for pair in pairs:
        for seed in config.seeds:
            for k in config.ks:
                for instr in config.instructions:
                    for cond in config.conditions:
                        units.append(WorkUnit(config.task, pair, "mask", get_condition(cond).name, instr, seed, k,
                                              config.n_test, layers))
                if config.layer_ablation:
                    units.append(WorkUnit(config.task, pair, "ablation", "", True, seed, k, config.n_test,
                                          tuple(range(num_layers + 1))))
    return list(dict.fromkeys(units))


# --------------------------------------------------------------------------- execution

def provenance(loaded, data_files: list[Path]) -> dict:
    import torch
    import transformers

    from . import __version__
    from .data import file_sha256

    return dict(
        icl_locate=__version__, python=platform.python_version(), torch=torch.__version__,
        transformers=transformers.__version__, platform=platform.platform(), model=loaded.info.as_dict(),
        model_files=_model_file_hashes(loaded.info.source),
        data_files={str(p): file_sha256(p) for p in data_files if Path(p).is_file()})


def _model_file_hashes(source: str) -> dict:
    """Identity of a local checkpoint: its manifest (embedded/GGUF cache) or config hash; hub ids keep the revision."""
    from .data import file_sha256

    path = Path(source)
    if not path.is_dir():
        return {}
    manifest = path / "icl-locate-manifest.json"
    if manifest.is_file():
        return json.loads(manifest.read_text())
    return {p.name: {"size": p.stat().st_size, **({"sha256": file_sha256(p)} if p.suffix == ".json" else {})}
            for p in sorted(path.iterdir()) if p.is_file()}


class Sweeper:
    """Runs planned units into a store, skipping finished ones."""

    def __init__(self, loaded, store, config: SweepConfig, log: Callable[[str], None] | None = None):
        from .fast_engine import SweepEngine

        self.loaded, self.store, self.config = loaded, store, config
        self.engine = SweepEngine(loaded.model, loaded.tokenizer, batch_size=config.batch_size)
        self.log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
        self._data: dict = {}

    def task_data(self, unit: WorkUnit):
        from .tasks import TaskOptions, get_task

        key = (unit.task, unit.pair)
        if key not in self._data:
            task = get_task(unit.task)
            self._data[key] = (task, task.load(TaskOptions(data_dir=self.config.data_dir, pair=unit.pair or None)))
        return self._data[key]

    def check_units(self, units: list[WorkUnit]) -> None:
        """Everything that can fail on input before any decoding: data, k, context length."""
        from .tasks import build_items

        for unit in units:
            task, data = self.task_data(unit)
            if unit.k > len(data.bank):
                raise UserError(f"k={unit.k} examples requested but the {unit.task} prompt bank has {len(data.bank)}")
            items = build_items(task, data, self.loaded.tokenizer, unit.k, unit.seed, unit.n_test, unit.instructions)
            limit = self.loaded.info.context_length
            longest = max(len(it.encoded.ids) for it in items)
            new = self.config.max_new_tokens or task.max_new_tokens
            if limit and longest + new > limit:
                raise UserError(f"{unit.label()}: prompt of {longest} tokens + {new} new tokens exceeds the model's "
                                f"context of {limit}")

    def run(self, units: list[WorkUnit], run_id: int) -> dict:
        done = self.store.done_units()
        todo = [u for u in units if u.unit_id not in done]
        self.log(f"{len(units)} units planned, {len(units) - len(todo)} already in the store, {len(todo)} to run")
        started, finished = time.time(), 0
        for n, unit in enumerate(todo, 1):
            if not self.store.claim(unit.unit_id):
                self.log(f"[{n}/{len(todo)}] {unit.label()}: done or running elsewhere, skipped")
                continue
            try:
                t0 = time.time()
                self._run_unit(unit, run_id)
                finished += 1
            except BaseException:
                self.store.release(unit.unit_id)
                raise
            elapsed = time.time() - started
            eta = elapsed / n * (len(todo) - n)
            self.log(f"[{n}/{len(todo)}] {unit.label()}: {time.time() - t0:.0f}s  "
                     f"(elapsed {elapsed:.0f}s, ~{eta:.0f}s left)")
        return dict(planned=len(units), skipped=len(units) - len(todo), ran=finished)

    def _run_unit(self, unit: WorkUnit, run_id: int) -> None:
        from .fast_engine import Variant
        from .masking import get_condition, hidden_ranges
        from .tasks import build_items, post_process

        task, data = self.task_data(unit)
        items = build_items(task, data, self.loaded.tokenizer, unit.k, unit.seed, unit.n_test, unit.instructions)
        n_layers = self.loaded.info.num_layers
        if unit.kind == "mask":
            condition = get_condition(unit.condition)
            variants = {("mask", j): Variant(from_layer=j) for j in unit.layers}
        else:
            condition = None
            variants = {("ablate", j): Variant(ablate=frozenset({j}) if j < n_layers else frozenset())
                        for j in unit.layers}
        t0 = time.time()
        gens = self.engine.generate([it.encoded for it in items], condition, list(variants.values()),
                                    stop_strings=task.stop_strings,
                                    max_new_tokens=self.config.max_new_tokens or task.max_new_tokens,
                                    progress=self._row_progress(unit))
        seconds = time.time() - t0
        predictions, scores = [], []
        for (kind, layer), variant in variants.items():
            outputs = [gens[(i, variant)] for i in range(len(items))]
            texts = [post_process(task, g.text) for g in outputs]
            sentence, stats, corpus = score_outputs(task, data, items, texts, unit.pair)
            scores += [(kind, layer, metric, value) for metric, value in corpus.items()]
            for i, (it, g, text) in enumerate(zip(items, outputs, texts)):
                enc = it.encoded
                masked = condition is not None and layer < n_layers
                ranges = hidden_ranges(condition, enc.spans, len(enc.ids)) if masked else []
                predictions.append(dict(
                    item=i, example_id=it.item.id, variant=kind, layer=layer,
                    prompt_token_ids=json.dumps(enc.ids), hidden_ranges=json.dumps(ranges),
                    in_context_ids=json.dumps(enc.example_ids), raw_generation=g.text, generation=text,
                    reference=it.item.target, finish=g.finish, sentence_score=sentence[i],
                    stats=json.dumps(stats[i]) if stats else None, **_span_lengths(enc.spans)))
        lengths = [_span_lengths(it.encoded.spans) for it in items]
        context = sum(n["n_instructions"] + n["n_examples"] for n in lengths) / len(items)
        query = sum(n["n_query"] for n in lengths) / len(items)
        self.store.commit_unit(unit.unit_id, run_id, asdict(unit), seconds, predictions, scores, context, query)


    def _row_progress(self, unit: WorkUnit):
        started = time.time()

        def report(done: int, total: int) -> None:
            rate = done / max(time.time() - started, 1e-9)
            print(f"\r  {unit.label()}: {done}/{total} (item, layer) rows, ~{(total - done) / rate:.0f}s left",
                  end="" if done < total else "\n", file=sys.stderr, flush=True)

        return report


def _span_lengths(spans: dict) -> dict:
    length = lambda p: (spans[p][1] - spans[p][0]) if spans.get(p) else 0  # noqa: E731
    return dict(n_instructions=length("instructions"), n_examples=length("examples"), n_query=length("query"))


def score_outputs(task, data, items, texts: list[str], pair: str):
    """Sentence scores, per-sentence BLEU statistics (for bootstrap), and corpus metrics."""
    if task.metric == "bleu":
        from .data import target_language
        from .metrics import translation_scores

        scores = translation_scores(texts, [it.item.target for it in items], target_language(pair))
        return scores.sentence_bleu, scores.sentence_stats, dict(bleu=scores.bleu, chrf=scores.chrf)
    from .metrics import pass_at_1
    from .sandbox import score_samples

    results = score_samples([{"task_id": it.item.id, "completion": t} for it, t in zip(items, texts)],
                            data.problems, workers=2)
    passed = [float(r.passed) for r in results]
    return passed, None, {"pass@1": pass_at_1([r.passed for r in results])}
