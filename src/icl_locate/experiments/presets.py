"""The sweep presets (the paper's experiments) as plain data: the command line lists them in its help
without importing the experiment code."""

from __future__ import annotations

MT_PAIRS = ["eng-fra", "fra-eng", "eng-por", "por-eng"]
PAPER_CONDITIONS = ["instructions+examples", "examples", "query", "instructions+examples+query", "all-but-last"]

PRESETS: dict[str, dict] = {
    "paper-mt": dict(
        task="flores", pairs=MT_PAIRS, conditions=PAPER_CONDITIONS, instructions=[True, False], seeds=[0, 1, 2], ks=[5]
    ),
    "paper-code": dict(
        task="humaneval", pairs=[""], conditions=PAPER_CONDITIONS, instructions=[True, False], seeds=[0, 1, 2], ks=[5]
    ),
    "paper-n-examples": dict(
        task="flores",
        pairs=MT_PAIRS,
        conditions=["instructions+examples"],
        instructions=[True],
        seeds=[0, 1, 2],
        ks=[0, 1, 2, 5, 10],
    ),
    "paper-layer-ablation": dict(
        task="flores", pairs=MT_PAIRS, conditions=[], instructions=[True], seeds=[0, 1, 2], ks=[5], layer_ablation=True
    ),
}
