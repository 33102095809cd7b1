"""``icl-locate score-code``: run HumanEval completions from a file in the sandbox; pass@1."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ..tasks.data import humaneval_problems
from ..tasks.metrics import pass_at_1
from ..tasks.sandbox import Limits, SampleResult, score_samples
from ..util.errors import UserError
from ..util.fileio import check_writable, write_jsonl_atomic
from .options import ScoreCodeSettings


@dataclass
class CodeScores:
    results: list[SampleResult]
    out: Path

    def summary(self) -> str:
        counts = {s: sum(r.status == s for r in self.results) for s in ("passed", "failed", "timed out")}
        return (
            f"pass@1 = {pass_at_1([r.passed for r in self.results]):.1f}% over {len(self.results)} samples "
            f"({counts['passed']} passed, {counts['failed']} failed, {counts['timed out']} timed out); "
            f"sandbox isolation: {', '.join(self.results[0].isolation) or 'resource limits only'}"
        )


def read_samples(path: Path, problems: dict) -> list[dict]:
    """``{"task_id", "completion"}`` lines; a malformed line or unknown task is one error naming file:line."""
    samples = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                sample = json.loads(line)
                task_id, completion = sample["task_id"], sample["completion"]
            except (ValueError, KeyError, TypeError):
                raise UserError(f'{path}:{n}: expected {{"task_id": ..., "completion": ...}}') from None
            if task_id not in problems:
                raise UserError(f"{path}:{n}: unknown HumanEval task_id {task_id!r}")
            samples.append({"task_id": task_id, "completion": completion})
    if not samples:
        raise UserError(f"{path} holds no samples")
    return samples


def score_code_file(settings: ScoreCodeSettings) -> CodeScores:
    """Every sample of ``settings.samples`` run in the sandbox; the per-sample results are written out."""
    path = Path(settings.samples)
    if not path.is_file():
        raise UserError(f"samples file not found: {path}")
    out_path = check_writable(settings.out or str(path.with_name(path.stem + "_results.jsonl")))
    problems = {p["task_id"]: p for p in humaneval_problems()}
    limits = Limits(timeout=settings.timeout)
    results = score_samples(read_samples(path, problems), problems, limits, workers=settings.workers)
    write_jsonl_atomic(out_path, [r.as_dict() for r in results])
    return CodeScores(results, out_path)
