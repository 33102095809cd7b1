"""Generations of prompts decoded with nothing changed, kept for the next unit of the same worker.

The same prompt decoded with no intervention appears in several units of one (model, task): the
layer sweep's row masked from L (nothing masked) and the "icl" baseline that the task-vector and
function-vector units store beside their patched rows. Every engine gives the reference engine's
generations (up to logits tied within rounding, which the audit looks for), so such a row decodes to
the same tokens wherever it appears; a worker keeps them by (prompt tokens, stop rule), except rows
an audit disputed, and a later unit takes them instead of decoding them again. What a unit stores
does not change; only the work a worker repeats does.

Likewise the readings of the ICL prompts with nothing masked (``UnmaskedReadings``): the task-vector
unit reads every layer's input at their last positions, the function-vector unit every head's output
there, the lens unit both and the last layer's output, all from one forward of the same prompts.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Collection, Sequence

from torch import nn

from ..core.conditions import MaskedPrompt
from ..core.interventions import RowIntervention
from ..engines.base import Generation, ResultKey, StopRule
from ..engines.readout import LastPositions, read_everything
from ..engines.rows import row_plan


class UnchangedGenerations:
    """Generations of unchanged prompts, by (prompt tokens, stop rule)."""

    def __init__(self):
        self.kept: dict[tuple[tuple[int, ...], StopRule], Generation] = {}
        self.reused = 0  # prompts taken from here instead of decoded

    def keep(
        self,
        prompts: Sequence[MaskedPrompt],
        rows: Sequence[RowIntervention],
        generations: dict[ResultKey, Generation],
        stop: StopRule,
        n_layers: int,
        disputed: Collection[ResultKey] = (),
    ) -> None:
        """Keep the generations of the rows that change nothing on their prompt (e.g. masked from L), but
        the ``disputed`` ones (an audit found the reference engine's tokens different)."""
        for row in rows:
            for i, prompt in enumerate(prompts):
                plan = row_plan(prompt, row, n_layers, i)
                if plan.mask_layers or plan.ablate or plan.patches or (i, row) in disputed:
                    continue
                if (i, row) in generations:
                    self.kept[(tuple(prompt.ids), stop)] = generations[(i, row)]

    def find(self, prompts: Sequence[MaskedPrompt], stop: StopRule) -> list[Generation] | None:
        """The kept generations of every one of ``prompts``, or None if any is missing."""
        found = [self.kept.get((tuple(p.ids), stop)) for p in prompts]
        if any(g is None for g in found):
            return None
        self.reused += len(found)
        return [g for g in found if g is not None]


class UnmaskedReadings:
    """``readout.read_everything`` of ICL prompts by (prompts, where their queries start): kept on the CPU, the
    least recently used dropped first past ``KEPT_BYTES`` (an atlas runs each method over all its cells
    before the next method), and handed back on the model's device."""

    KEPT_BYTES = 1 << 30

    def __init__(self):
        self.kept: OrderedDict[tuple, LastPositions] = OrderedDict()
        self.reused = 0  # times taken from here instead of read

    def read(self, model: nn.Module, prompts: Sequence[Sequence[int]], starts: Sequence[int]) -> LastPositions:
        key = (tuple(tuple(ids) for ids in prompts), tuple(starts))
        if key in self.kept:
            self.reused += 1
            self.kept.move_to_end(key)
        else:
            self.kept[key] = read_everything(model, prompts, starts).to("cpu")
            while len(self.kept) > 1 and sum(r.nbytes() for r in self.kept.values()) > self.KEPT_BYTES:
                self.kept.popitem(last=False)
        return self.kept[key].to(next(model.parameters()).device)
