"""Draft tokens for exact greedy decoding by verification (the tree engine feeds them).

A draft is a guess of the next few tokens of a history group. The engine feeds the group's last
token and the draft in one forward pass and keeps the model's own predictions for as long as they
equal the draft, plus the prediction after the last match: the same tokens as one-by-one greedy
decoding, in fewer steps when the guess is good. Guesses come from text the group is likely to
repeat, found by n-gram lookup (the last n tokens, n = 3, 2, 1, most recent occurrence first) in
1. the other groups of the same query: rows whose masks differ often say the same thing, one
   of them a token ahead after they diverged;
2. the group's own output (the degenerate loops of rows masked below the recognition layer);
3. the prompt (names and numbers copied from the source sentence or the examples).
A group whose drafts keep failing drafts less: after ``patience`` misses in a row it pauses for
2, 4, 8, ... steps (at most 32).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol


class DraftState(Protocol):
    history: list[int]
    fails: int
    pause: int


def _continuation(source: Sequence[int], key: Sequence[int], limit: int) -> list[int]:
    """The tokens after the most recent occurrence of ``key`` in ``source`` that has any (so the
    key at the very end of the group's own history does not find itself)."""
    n = len(key)
    for i in range(len(source) - n - 1, -1, -1):
        if source[i + n - 1] == key[-1] and list(source[i : i + n]) == list(key):
            return list(source[i + n : i + n + limit])
    return []


def accepted_tokens(predicted: Sequence[int], draft: Sequence[int]) -> list[int]:
    """The tokens a row takes from a step fed its last token and ``draft``: its first prediction, then, while
    the prediction equals the draft token fed next, the prediction after it (``predicted``: one per fed
    position); exactly what one-by-one greedy decoding would produce."""
    out = [predicted[0]]
    while len(out) <= len(draft) and out[-1] == draft[len(out) - 1]:
        out.append(predicted[len(out)])
    return out


class Drafter:
    def __init__(self, max_tokens: int = 4, ngram: int = 3, patience: int = 2):
        if max_tokens < 1 or ngram < 1 or patience < 1:
            raise ValueError("draft length, n-gram size and patience must be >= 1")
        self.max_tokens, self.ngram, self.patience = max_tokens, ngram, patience

    def propose(
        self, group: DraftState, prompt: Sequence[int], siblings: Sequence[Sequence[int]], limit: int
    ) -> list[int]:
        """Up to min(max_tokens, limit) draft tokens for ``group`` (empty: no draft this step)."""
        limit = min(self.max_tokens, limit)
        if group.pause > 0:
            group.pause -= 1
            return []
        if limit <= 0 or not group.history:
            return []
        own = group.history
        for n in range(min(self.ngram, len(own)), 0, -1):
            key = own[-n:]
            for source in siblings:
                found = _continuation(source, key, limit)
                if found:
                    return found
            found = _continuation(own, key, limit)
            if found:
                return found
            found = _continuation(prompt, key, limit)
            if found:
                return found
        return []

    def feedback(self, group: DraftState, accepted: int) -> None:
        """``accepted``: the draft tokens the group kept at its last step (of a non-empty draft)."""
        if accepted:
            group.fails = 0
            return
        group.fails += 1
        if group.fails >= self.patience:
            group.pause = 2 ** min(group.fails - self.patience + 1, 5)
