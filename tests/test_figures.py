"""Figures read right: axes that count layers or heads carry the integers they count."""

from __future__ import annotations

import numpy as np
import pytest

from icl_locate.results.analysis import HeadMap
from icl_locate.results.figures import head_figure
from icl_locate.tasks.metrics import Bleu


def head_map(layers: list[int], heads: list[int]) -> HeadMap:
    key = dict(
        kind="knockout", task="flores", pair="fra-eng", condition="instructions+examples", instructions=True, k=5
    )
    delta = np.arange(len(layers) * len(heads), dtype=float).reshape(len(layers), len(heads))  # [layers, heads]
    return HeadMap(
        key=key,
        layers=layers,
        heads=heads,
        metric=Bleu(),
        stats=np.zeros((1, len(layers), len(heads), 1, 1)),
        reference=np.zeros((1, 1, 1)),
        delta=delta,
    )


def tick_labels(axis) -> list[str]:
    return [t.get_text() for t in axis.get_ticklabels()]


@pytest.mark.parametrize(
    "layers, heads", [([8, 9], [0, 1, 2, 3]), ([0, 4, 8, 12], [0, 1]), (list(range(18)), list(range(4)))]
)
def test_head_heatmap_ticks_are_the_swept_layers_and_heads(layers, heads):
    import matplotlib.pyplot as plt

    fig = head_figure(head_map(layers, heads), recognition=None)
    ax = fig.axes[0]
    assert tick_labels(ax.yaxis) == [str(layer) for layer in layers]  # not 7.50, 7.75, ... for two layers
    assert tick_labels(ax.xaxis) == [str(h) for h in heads]
    assert list(ax.get_yticks()) == list(range(len(layers)))  # one tick per row, at the row's centre
    plt.close(fig)


def test_head_heatmap_thins_crowded_ticks_and_places_the_recognition_line_between_rows():
    import matplotlib.pyplot as plt

    layers = list(range(0, 64, 2))  # 32 rows: every second one labelled
    fig = head_figure(head_map(layers, list(range(40))), recognition=9)
    ax = fig.axes[0]
    assert tick_labels(ax.yaxis) == [str(layer) for layer in layers[::2]]
    assert tick_labels(ax.xaxis) == [str(h) for h in range(0, 40, 2)]
    line = ax.get_lines()[0]
    assert line.get_ydata()[0] == pytest.approx(5 - 0.5)  # layers 0, 2, 4, 6, 8 lie below layer 9
    plt.close(fig)
