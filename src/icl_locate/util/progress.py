"""The one progress facility: a tqdm bar with ETA on a terminal, one plain line per step elsewhere.

Under CI or with stderr redirected to a file, a bar would write thousands of carriage returns;
there each finished step prints one line ``label [done/total] note (elapsed, ~ETA left)``, and
fine-grained progress inside a step (``inner``) stays silent.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from typing import TextIO

from tqdm import tqdm


def interactive(stream: TextIO) -> bool:
    """Bars only on a terminal, never under CI."""
    return hasattr(stream, "isatty") and stream.isatty() and not os.environ.get("CI")


class Progress:
    """Steps done out of ``total`` (units, layers, items), with elapsed time and ETA."""

    def __init__(self, total: int, label: str, stream: TextIO | None = None, bar: bool | None = None):
        self.total, self.label, self.done = total, label, 0
        self.stream = stream or sys.stderr
        self.started = time.time()
        self.bar = (
            tqdm(total=total, desc=label, file=self.stream, dynamic_ncols=True, leave=True)
            if (interactive(self.stream) if bar is None else bar)
            else None
        )

    def advance(self, note: str = "", n: int = 1) -> None:
        """``n`` more steps finished; ``note`` says which (shown in the line or after the bar)."""
        self.done += n
        if self.bar is not None:
            self.bar.set_postfix_str(note[:60], refresh=False)
            self.bar.update(n)
            return
        elapsed = time.time() - self.started
        eta = elapsed / self.done * (self.total - self.done) if self.done else 0.0
        print(
            f"{self.label} [{self.done}/{self.total}] {note}  ({elapsed:.0f}s elapsed, ~{eta:.0f}s left)".rstrip(),
            file=self.stream,
            flush=True,
        )

    def inner(self, label: str) -> Callable[[int, int], None] | None:
        """A ``(done, total)`` callback for progress inside one step: a second bar on a terminal, else None."""
        if self.bar is None:
            return None
        bar = tqdm(desc=f"  {label}", file=self.stream, dynamic_ncols=True, leave=False)

        def report(done: int, total: int) -> None:
            bar.total = total
            bar.n = done
            bar.refresh()
            if done >= total:
                bar.close()

        return report

    def log(self, message: str) -> None:
        """A message that does not break the bar."""
        if self.bar is not None:
            self.bar.write(message, file=self.stream)
        else:
            print(message, file=self.stream, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
