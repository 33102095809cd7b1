"""Metrics as objects: per-item statistics, a corpus aggregate, a name and a direction.

Every metric turns a task's answers into ``Scored``: a score per item, per-item *sufficient
statistics* (the corpus score of any subset of items is ``aggregate`` of their rows, which is
what the bootstrap resamples), corpus scores (the primary one under ``name``, extras beside it)
and per-item details for the ``run`` output. Adding a metric = one class here, and naming it on
a task.

BLEU = sacrebleu corpus BLEU, lowercased, 13a tokenisation, on the *first sentence* of each
hypothesis. The paper splits sentences with nltk's punkt (which needs a model download); we use
pysbd, which ships its rules. The two agree on ordinary prose; they can differ on abbreviations
and unusual punctuation, so BLEU here can differ slightly from the paper's on the same outputs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache
from typing import Protocol, Sequence

import numpy as np
import pysbd
from sacrebleu.metrics import BLEU, CHRF

from .sandbox import Limits, score_samples


@dataclass
class Scored:
    """A metric applied to a list of answers (item order)."""

    sentence: list[float]  # per-item score (sentence BLEU; 1/0 for pass@1)
    stats: list[list[float]]  # per-item sufficient statistics, rows of ``aggregate``
    corpus: dict[str, float]  # the primary metric under its name, extra corpus metrics beside it
    details: list[dict] = field(default_factory=list)  # per-item fields for the run output
    summary: str = ""  # one line for people


class Metric(Protocol):
    name: str  # key in the store's scores table
    label: str  # axis label
    higher_is_better: bool

    def score(self, answers: Sequence[str], examples: Sequence, data) -> Scored:
        """Score ``answers`` against ``examples`` (ids and targets, same order). ``data`` is the
        task's TaskData, for what a metric needs beyond references (language, HumanEval problems)."""

    def aggregate(self, stats: np.ndarray) -> float:
        """Corpus score from per-item statistics [items, d]."""


# --------------------------------------------------------------------------- BLEU / chrF

@lru_cache(maxsize=8)
def _segmenter(language: str):
    try:
        return pysbd.Segmenter(language=language, clean=False)
    except ValueError:  # pysbd has no rules for this language: English rules split on . ! ? as well
        return pysbd.Segmenter(language="en", clean=False)


def first_sentence(text: str, language: str = "en") -> str:
    text = text.strip()
    if not text:
        return ""
    sentences = _segmenter(language).segment(text)
    return sentences[0].strip() if sentences else text


@dataclass
class TranslationScores:
    bleu: float
    chrf: float
    sentence_bleu: list[float] = field(default_factory=list)
    sentence_chrf: list[float] = field(default_factory=list)
    sentence_stats: list[list[float]] = field(default_factory=list)  # BLEU sufficient statistics, for bootstrap
    hypotheses: list[str] = field(default_factory=list)  # what was scored (first sentences)
    signature: str = ""


def translation_scores(hypotheses: Sequence[str], references: Sequence[str], language: str = "en") -> TranslationScores:
    """Corpus and sentence-level BLEU (lowercase, 13a) and chrF on first sentences."""
    if len(hypotheses) != len(references):
        raise ValueError("one hypothesis per reference")
    hyps = [first_sentence(h, language) for h in hypotheses]
    refs = list(references)
    bleu = BLEU(lowercase=True, tokenize="13a")
    sent_bleu = BLEU(lowercase=True, tokenize="13a", effective_order=True)
    chrf = CHRF()
    corpus = bleu.corpus_score(hyps, [refs])
    return TranslationScores(
        bleu=corpus.score,
        chrf=chrf.corpus_score(hyps, [refs]).score,
        sentence_bleu=[sent_bleu.sentence_score(h, [r]).score for h, r in zip(hyps, refs)],
        sentence_chrf=[chrf.sentence_score(h, [r]).score for h, r in zip(hyps, refs)],
        sentence_stats=[bleu_statistics(bleu, h, r) for h, r in zip(hyps, refs)],
        hypotheses=hyps,
        signature=str(bleu.get_signature()),
    )


def bleu_statistics(bleu, hypothesis: str, reference: str) -> list[float]:
    """[sys_len, ref_len, correct_1..4, total_1..4]: corpus BLEU of any subset is a function of their sums."""
    s = bleu.corpus_score([hypothesis], [[reference]])
    return [s.sys_len, s.ref_len, *s.counts, *s.totals]


def bleu_from_statistics(stats_sum) -> float:
    """Corpus BLEU (lowercase 13a, exp smoothing as sacrebleu's default) from summed statistics."""
    stats = [int(round(x)) for x in stats_sum]
    sys_len, ref_len = stats[0], stats[1]
    correct, total = stats[2:6], stats[6:10]
    return BLEU.compute_bleu(correct=correct, total=total, sys_len=sys_len, ref_len=ref_len).score


@dataclass(frozen=True)
class Bleu:
    """Corpus BLEU of first sentences (chrF reported beside it)."""

    name: str = "bleu"
    label: str = "BLEU"
    higher_is_better: bool = True

    def score(self, answers: Sequence[str], examples: Sequence, data) -> Scored:
        s = translation_scores(answers, [ex.target for ex in examples], getattr(data, "language", "") or "en")
        details = [dict(scored_hypothesis=h, sentence_bleu=b, sentence_chrf=c)
                   for h, b, c in zip(s.hypotheses, s.sentence_bleu, s.sentence_chrf)]
        return Scored(sentence=s.sentence_bleu, stats=s.sentence_stats, corpus=dict(bleu=s.bleu, chrf=s.chrf),
                      details=details,
                      summary=f"corpus BLEU = {s.bleu:.2f}  chrF = {s.chrf:.2f}  ({len(answers)} sentences; "
                              f"{s.signature})")

    def aggregate(self, stats: np.ndarray) -> float:
        return bleu_from_statistics(stats.sum(axis=0))


# --------------------------------------------------------------------------- pass@1

def pass_at_1(passed: Sequence[bool]) -> float:
    """pass@1 with one greedy sample per problem: the fraction that passed, in percent."""
    return 100.0 * sum(passed) / len(passed) if passed else 0.0


@dataclass(frozen=True)
class PassAt1:
    """HumanEval-style functional correctness: each completion runs against its tests in the sandbox."""

    name: str = "pass@1"
    label: str = "pass@1 (%)"
    higher_is_better: bool = True
    workers: int = 2
    timeout: float = 3.0

    def score(self, answers: Sequence[str], examples: Sequence, data) -> Scored:
        ids = [ex.id for ex in examples]
        results = score_samples([{"task_id": i, "completion": a} for i, a in zip(ids, answers)], data.problems,
                                Limits(timeout=self.timeout), workers=self.workers)
        passed = [r.passed for r in results]
        score = pass_at_1(passed)
        return Scored(sentence=[float(p) for p in passed], stats=[[float(p)] for p in passed],
                      corpus={self.name: score},
                      details=[dict(passed=r.passed, result=r.status, result_reason=r.reason) for r in results],
                      summary=f"pass@1 = {score:.1f}% ({sum(passed)}/{len(passed)})")

    def aggregate(self, stats: np.ndarray) -> float:
        return 100.0 * float(stats[:, 0].mean())
