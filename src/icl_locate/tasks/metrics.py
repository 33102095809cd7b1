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

import string
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from functools import lru_cache
from typing import Protocol

import numpy as np
import pysbd
from sacrebleu.metrics.bleu import BLEU
from sacrebleu.metrics.chrf import CHRF

from ..util.errors import UserError
from . import sandbox
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
    # read-only: the metrics are frozen dataclasses
    @property
    def name(self) -> str: ...  # key in the store's scores table

    @property
    def label(self) -> str: ...  # axis label

    @property
    def higher_is_better(self) -> bool: ...

    def score(self, answers: Sequence[str], examples: Sequence, data) -> Scored:
        """Score ``answers`` against ``examples`` (ids and targets, same order). ``data`` is the
        task's TaskData, for what a metric needs beyond references (language, HumanEval problems)."""
        ...

    def aggregate(self, stats: np.ndarray) -> float:
        """Corpus score from per-item statistics [items, d]."""
        ...


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
        details = [
            dict(scored_hypothesis=h, sentence_bleu=b, sentence_chrf=c)
            for h, b, c in zip(s.hypotheses, s.sentence_bleu, s.sentence_chrf)
        ]
        return Scored(
            sentence=s.sentence_bleu,
            stats=s.sentence_stats,
            corpus=dict(bleu=s.bleu, chrf=s.chrf),
            details=details,
            summary=f"corpus BLEU = {s.bleu:.2f}  chrF = {s.chrf:.2f}  ({len(answers)} sentences; {s.signature})",
        )

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
    workers: int = sandbox.WORKERS
    timeout: float = sandbox.TIMEOUT

    def score(self, answers: Sequence[str], examples: Sequence, data) -> Scored:
        ids = [ex.id for ex in examples]
        results = score_samples(
            [{"task_id": i, "completion": a} for i, a in zip(ids, answers)],
            data.problems,
            Limits(timeout=self.timeout),
            workers=self.workers,
        )
        passed = [r.passed for r in results]
        score = pass_at_1(passed)
        return Scored(
            sentence=[float(p) for p in passed],
            stats=[[float(p)] for p in passed],
            corpus={self.name: score},
            details=[dict(passed=r.passed, result=r.status, result_reason=r.reason) for r in results],
            summary=f"pass@1 = {score:.1f}% ({sum(passed)}/{len(passed)})",
        )

    def aggregate(self, stats: np.ndarray) -> float:
        return 100.0 * float(stats[:, 0].mean())


@dataclass(frozen=True)
class Chrf:
    """Corpus chrF (sacrebleu defaults) of first sentences, as the primary metric."""

    name: str = "chrf"
    label: str = "chrF"
    higher_is_better: bool = True

    def score(self, answers: Sequence[str], examples: Sequence, data) -> Scored:
        language = getattr(data, "language", "") or "en"
        hyps = [first_sentence(a, language) for a in answers]
        refs = [ex.target for ex in examples]
        chrf = CHRF()
        stats = [list(map(float, row)) for row in chrf._extract_corpus_statistics(hyps, [refs])]
        sentence = [chrf.sentence_score(h, [r]).score for h, r in zip(hyps, refs)]
        corpus = self.aggregate(np.array(stats)) if stats else 0.0
        return Scored(
            sentence=sentence,
            stats=stats,
            corpus={"chrf": corpus},
            details=[dict(scored_hypothesis=h, sentence_chrf=c) for h, c in zip(hyps, sentence)],
            summary=f"corpus chrF = {corpus:.2f} ({len(answers)} sentences)",
        )

    def aggregate(self, stats: np.ndarray) -> float:
        return CHRF()._compute_score_from_stats([int(round(x)) for x in stats.sum(axis=0)]).score


# --------------------------------------------------------------------------- short answers and labels


@dataclass(frozen=True)
class Normalise:
    """How answers and references are compared: each step can be switched off in the task file."""

    lowercase: bool = True
    strip_punctuation: bool = True
    collapse_whitespace: bool = True
    strip_accents: bool = False

    def __call__(self, text: str) -> str:
        if self.strip_accents:
            text = "".join(c for c in unicodedata.normalize("NFKD", text) if not unicodedata.combining(c))
        if self.lowercase:
            text = text.lower()
        if self.strip_punctuation:
            text = "".join(
                " " if unicodedata.category(c).startswith("P") or c in string.punctuation else c for c in text
            )
        if self.collapse_whitespace:
            text = " ".join(text.split())
        return text


@dataclass(frozen=True)
class ExactMatch:
    """The answer equals the reference after normalisation (case, punctuation, whitespace: configurable)."""

    name: str = "exact_match"
    label: str = "exact match (%)"
    higher_is_better: bool = True
    normalise: Normalise = Normalise()

    def score(self, answers: Sequence[str], examples: Sequence, data) -> Scored:
        hits = [float(self.normalise(a) == self.normalise(ex.target)) for a, ex in zip(answers, examples)]
        value = 100.0 * sum(hits) / len(hits) if hits else 0.0
        return Scored(
            sentence=hits,
            stats=[[h] for h in hits],
            corpus={self.name: value},
            details=[dict(normalised_answer=self.normalise(a), correct=bool(h)) for a, h in zip(answers, hits)],
            summary=f"exact match = {value:.1f}% ({int(sum(hits))}/{len(hits)})",
        )

    def aggregate(self, stats: np.ndarray) -> float:
        return 100.0 * float(stats[:, 0].mean())


@dataclass(frozen=True)
class Accuracy:
    """Classification: the answer's first word, normalised, names a label (or one of its label words);
    correct when that is the reference's label. An answer naming no label is wrong."""

    name: str = "accuracy"
    label: str = "accuracy (%)"
    higher_is_better: bool = True
    labels: tuple[str, ...] = ()
    label_words: tuple[tuple[str, tuple[str, ...]], ...] = ()  # label -> words that also name it
    normalise: Normalise = Normalise()

    def words(self) -> dict[str, str]:
        """normalised word -> label"""
        table = {self.normalise(label): label for label in self.labels}
        for label, words in self.label_words:
            table.update({self.normalise(w): label for w in words})
        return table

    def predicted(self, answer: str) -> str | None:
        first = self.normalise(answer).split(" ")[0] if answer.strip() else ""
        return self.words().get(first)

    def check_labels(self, targets: Sequence[str], where: str) -> None:
        known = {self.normalise(label) for label in self.labels}
        for i, target in enumerate(targets, 1):
            if self.normalise(target) not in known:
                raise UserError(f"{where}: label {target!r} of record {i} is not one of the labels {list(self.labels)}")

    def score(self, answers: Sequence[str], examples: Sequence, data) -> Scored:
        predicted = [self.predicted(a) for a in answers]
        hits = [
            float(p is not None and self.normalise(p) == self.normalise(ex.target))
            for p, ex in zip(predicted, examples)
        ]
        value = 100.0 * sum(hits) / len(hits) if hits else 0.0
        unknown = sum(p is None for p in predicted)
        return Scored(
            sentence=hits,
            stats=[[h] for h in hits],
            corpus={self.name: value},
            details=[dict(predicted_label=p, correct=bool(h)) for p, h in zip(predicted, hits)],
            summary=f"accuracy = {value:.1f}% ({int(sum(hits))}/{len(hits)}; {unknown} answers named no label)",
        )

    def aggregate(self, stats: np.ndarray) -> float:
        return 100.0 * float(stats[:, 0].mean())


# --------------------------------------------------------------------------- registry

METRICS: dict[str, type] = {
    "bleu": Bleu,
    "chrf": Chrf,
    "exact_match": ExactMatch,
    "accuracy": Accuracy,
    "pass@1": PassAt1,
}


def metric_named(name: str) -> Metric:
    """A metric by its stored name, default options (what ``aggregate`` needs: per-item statistics carry the rest)."""
    if name not in METRICS:
        raise UserError(f"unknown metric {name!r}; available: {', '.join(METRICS)}")
    return METRICS[name]()


def make_metric(spec: str | dict, where: str = "metric") -> Metric:
    """A metric from a task file: a name, or a mapping with ``name`` and its options."""
    if isinstance(spec, str):
        spec = {"name": spec}
    if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
        raise UserError(f"{where}: give a metric name ({', '.join(METRICS)}) or a mapping with 'name'")
    options = dict(spec)
    name = options.pop("name")
    cls = METRICS.get(name)
    if cls is None:
        raise UserError(f"{where}: unknown metric {name!r}; available: {', '.join(METRICS)}")
    normalise = {k: options.pop(k) for k in [f.name for f in fields(Normalise)] if k in options}
    for k, v in normalise.items():
        if not isinstance(v, bool):
            raise UserError(f"{where}: {k} must be true or false, got {v!r}")
    kwargs: dict = {}
    if cls in (ExactMatch, Accuracy):
        kwargs["normalise"] = Normalise(**normalise)
    elif normalise:
        raise UserError(f"{where}: {name} takes no normalisation options ({', '.join(normalise)})")
    if cls is Accuracy:
        labels = options.pop("labels", None)
        words = options.pop("label_words", None) or {}
        if not isinstance(words, dict) or not all(
            isinstance(w, list) and all(isinstance(x, str) for x in w) for w in words.values()
        ):
            raise UserError(f"{where}: label_words maps each label to a list of words")
        labels = labels if labels is not None else list(words)
        if not isinstance(labels, list) or len(labels) < 2 or not all(isinstance(x, str) and x for x in labels):
            raise UserError(f"{where}: accuracy needs labels: a list of at least two label names")
        unknown = [label for label in words if label not in labels]
        if unknown:
            raise UserError(f"{where}: label_words names labels that are not in labels: {unknown}")
        kwargs.update(labels=tuple(labels), label_words=tuple((k, tuple(v)) for k, v in words.items()))
    if cls is PassAt1:
        for key in ("workers", "timeout"):
            if key in options:
                kwargs[key] = options.pop(key)
    if options:
        raise UserError(f"{where}: unknown option(s) for {name}: {', '.join(sorted(options))}")
    return cls(**kwargs)
