"""A decoder's sizes as plain numbers, and those of every model alias: what ``icl-locate plan`` needs to
cost a sweep without the model's weights, its config or a network (no torch here).

The alias numbers are those of each model's published ``config.json``; ``params`` is the published
parameter count (the checkpoint's), which ``computed_params`` (from the other numbers) must match
within a few percent (tested): a wrong number in the table shows up there.
"""

from __future__ import annotations

from dataclasses import dataclass

from .catalog import EMBEDDED

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclass(frozen=True)
class ModelShape:
    """The sizes the cost model reads: per-layer weights, attention width, KV width, vocabulary, context."""

    layers: int
    hidden: int
    heads: int  # query heads
    kv_heads: int  # key/value heads (grouped-query attention: fewer than heads)
    head_dim: int
    intermediate: int  # MLP width
    vocab: int
    context: int | None  # longest prompt + answer the model takes (None: no limit known)
    params: int  # parameter count: published (aliases) or counted (loaded configs)
    tied: bool  # the LM head is the input embedding matrix (counted once)
    mlp_matrices: int = 3  # 3: gated MLP (gate, up, down), 2: up and down
    windows: tuple[int | None, ...] = (None,)  # sliding window per layer, the pattern repeated (None: full)
    positions: int = 0  # rows of a learned position embedding (GPT-Neo); 0 for rotary / ALiBi

    def layer_params(self) -> int:
        """Weights of one decoder layer (matrices only: norms and biases are < 0.1% of them)."""
        qkv = self.hidden * (self.heads + 2 * self.kv_heads) * self.head_dim
        attention = qkv + self.heads * self.head_dim * self.hidden  # + the output projection
        return attention + self.mlp_matrices * self.hidden * self.intermediate

    def computed_params(self) -> int:
        """The parameter count these numbers imply: layers, embeddings (twice if untied), positions."""
        embeddings = self.vocab * self.hidden * (1 if self.tied else 2)
        return self.layers * self.layer_params() + embeddings + self.positions * self.hidden

    def layer_windows(self) -> tuple[int | None, ...]:
        """The sliding window of each layer (``windows`` repeated over the layers)."""
        return tuple(self.windows[i % len(self.windows)] for i in range(self.layers))

    def head_share(self) -> float:
        """The LM head's share of a generated token's weight FLOPs (the rest: the layers)."""
        return self.vocab * self.hidden / (self.vocab * self.hidden + self.layers * self.layer_params())

    def kv_bytes_per_token(self, dtype_bytes: int) -> int:
        """Keys and values of one token in every layer's cache (the engines keep every column)."""
        return 2 * self.layers * self.kv_heads * self.head_dim * dtype_bytes


# alias -> its published config.json, as numbers. Gemma-3: 5 sliding layers (512) then a full one;
# GPT-Neo: global and local (256) layers alternate; StarCoder2: a 4096 window in every layer.
ALIAS_SHAPES: dict[str, ModelShape] = {
    EMBEDDED: ModelShape(
        layers=18, hidden=640, heads=4, kv_heads=1, head_dim=256, intermediate=2048, vocab=262_144,
        context=32_768, params=268_098_176, tied=True, windows=(512, 512, 512, 512, 512, None),
    ),
    "gpt-neo-2.7b": ModelShape(
        layers=32, hidden=2560, heads=20, kv_heads=20, head_dim=128, intermediate=10_240, vocab=50_257,
        context=2048, params=2_651_307_520, tied=True, mlp_matrices=2, windows=(None, 256), positions=2048,
    ),
    "bloom-3b": ModelShape(
        layers=30, hidden=2560, heads=32, kv_heads=32, head_dim=80, intermediate=10_240, vocab=250_880,
        context=2048, params=3_002_557_440, tied=True, mlp_matrices=2,
    ),
    "starcoder2-7b": ModelShape(
        layers=32, hidden=4608, heads=36, kv_heads=4, head_dim=128, intermediate=18_432, vocab=49_152,
        context=16_384, params=7_173_923_840, tied=True, mlp_matrices=2, windows=(4096,),
    ),
    "llama-3.1-8b": ModelShape(
        layers=32, hidden=4096, heads=32, kv_heads=8, head_dim=128, intermediate=14_336, vocab=128_256,
        context=131_072, params=8_030_261_248, tied=False,
    ),
}  # fmt: skip
ALIAS_SHAPES["llama-3.1-8b-instruct"] = ALIAS_SHAPES["llama-3.1-8b"]  # the same network, other weights
