"""Scores: BLEU and chrF as the paper computes them, and pass@1.

BLEU = sacrebleu corpus BLEU, lowercased, 13a tokenisation, on the *first sentence* of each
hypothesis. The paper splits sentences with nltk's punkt (which needs a model download); we use
pysbd, which ships its rules. The two agree on ordinary prose; they can differ on abbreviations
and unusual punctuation, so BLEU here can differ slightly from the paper's on the same outputs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache
from typing import Sequence


@lru_cache(maxsize=8)
def _segmenter(language: str):
    import pysbd

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
    from sacrebleu.metrics import BLEU, CHRF

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
    from sacrebleu.metrics import BLEU

    stats = [int(round(x)) for x in stats_sum]
    sys_len, ref_len = stats[0], stats[1]
    correct, total = stats[2:6], stats[6:10]
    return BLEU.compute_bleu(correct=correct, total=total, sys_len=sys_len, ref_len=ref_len).score


def pass_at_1(passed: Sequence[bool]) -> float:
    """pass@1 with one greedy sample per problem: the fraction that passed, in percent."""
    return 100.0 * sum(passed) / len(passed) if passed else 0.0
