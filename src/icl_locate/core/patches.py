"""Activation patches: batch interventions that write into the residual stream or into one head's output.

What task vectors, function vectors and the logit lens need beside context masking:

* ``ReplaceHidden`` / ``AddHidden``: the hidden state at layer ``l``, column ``p`` becomes (gets
  added) a given vector. "The hidden state at layer l" is the input of decoder layer l, i.e.
  ``output_hidden_states[l]`` of the model's own forward (l = 0: right after the embeddings).
* ``ReplaceHeadOutput``: head ``h``'s output at layer ``l``, column ``p`` becomes a given vector of
  size head_dim. A head's output is its slice of the input of the attention's output projection
  (o_proj / out_proj / dense / c_proj), before the heads are mixed.

Positions are columns of the batch as fed (left padding included), like ``ColumnMask``'s. A patch
applies whenever a forward processes its column (the prefill), never to tokens generated later:
with a KV cache those see the patched token's keys and values, which is the intended effect.
``row`` picks one batch row (None: every row). They are immutable values (the vector is copied on
construction; equality is identity, since a tensor has no usable ``==``), activated like the masks
by ``interventions.intervene``; ``patch_hooks`` carries them out.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch
from torch import nn

from .structure import attention_module, decoder_layers, num_heads, num_layers, output_projection, text_config
from .surgery import PassThrough


def _check_site(layer: int, position: int, row: int | None, vector: torch.Tensor, head: int = 0) -> None:
    if min(layer, position, head) < 0 or (row is not None and row < 0):
        raise ValueError(f"layer, head, position and row must be >= 0, got {(layer, head, position, row)}")
    if vector.dim() != 1:
        raise ValueError(f"a patch vector must be 1D, got shape {tuple(vector.shape)}")


@dataclass(frozen=True, eq=False)
class ReplaceHidden:
    """Row ``row``'s (None: every row's) input of decoder layer ``layer`` at column ``position`` becomes ``vector``."""

    layer: int
    position: int
    vector: torch.Tensor  # [hidden_size]
    row: int | None = None

    def __post_init__(self):
        _check_site(self.layer, self.position, self.row, self.vector)
        object.__setattr__(self, "vector", self.vector.detach().clone())  # the caller's tensor may change later

    def all_layers(self) -> frozenset[int]:
        return frozenset({self.layer})


@dataclass(frozen=True, eq=False)
class AddHidden:
    """``vector`` is added to row ``row``'s (None: every row's) input of decoder layer ``layer`` at ``position``."""

    layer: int
    position: int
    vector: torch.Tensor  # [hidden_size]
    row: int | None = None

    def __post_init__(self):
        _check_site(self.layer, self.position, self.row, self.vector)
        object.__setattr__(self, "vector", self.vector.detach().clone())

    def all_layers(self) -> frozenset[int]:
        return frozenset({self.layer})


@dataclass(frozen=True, eq=False)
class ReplaceHeadOutput:
    """Head ``head``'s output at layer ``layer``, column ``position`` of row ``row`` (None: every row) becomes
    ``vector`` (its slice of the output projection's input)."""

    layer: int
    head: int
    position: int
    vector: torch.Tensor  # [head_dim]
    row: int | None = None

    def __post_init__(self):
        _check_site(self.layer, self.position, self.row, self.vector, self.head)
        object.__setattr__(self, "vector", self.vector.detach().clone())

    def all_layers(self) -> frozenset[int]:
        return frozenset({self.layer})


Patch = ReplaceHidden | AddHidden | ReplaceHeadOutput
PATCH_TYPES = (ReplaceHidden, AddHidden, ReplaceHeadOutput)


@dataclass(frozen=True, eq=False)
class PatchLastPosition:
    """A row intervention (what a sweep row does, like ``MaskFrom``): at the input of decoder layer
    ``layer``, each prompt's last position gets ``vector`` (``add``) or has its hidden state replaced
    by it (``replace``). ``vectors`` is one [hidden_size] vector for every prompt, or [prompts,
    hidden_size], one per prompt index. The task-vector sweep replaces with the vector read from
    another query's ICL prompt; the function-vector sweep adds the task's function vector. Equality
    is identity (engines key rows by it)."""

    layer: int
    mode: str  # "replace" | "add"
    vectors: torch.Tensor  # [hidden_size] or [prompts, hidden_size]

    def __post_init__(self):
        if self.mode not in ("replace", "add"):
            raise ValueError(f"mode must be 'replace' or 'add', got {self.mode!r}")
        if self.layer < 0 or self.vectors.dim() not in (1, 2):
            raise ValueError(
                f"need layer >= 0 and vectors of 1 or 2 dimensions, got {self.layer}, {self.vectors.dim()}"
            )
        object.__setattr__(self, "vectors", self.vectors.detach().clone())

    def patches(self, item: int, prompt_len: int) -> tuple[Patch, ...]:
        """The patch on prompt ``item`` (``prompt_len`` tokens), at its own columns (no padding, every row)."""
        vector = self.vectors if self.vectors.dim() == 1 else self.vectors[item]
        kind = ReplaceHidden if self.mode == "replace" else AddHidden
        return (kind(self.layer, prompt_len - 1, vector),)


def patch_rows(patches: Sequence[Patch], rows: Sequence[int]) -> tuple[Patch, ...]:
    """The patches of the batch made of ``rows`` of this one: a patch of row ``rows[i]`` moves to row i,
    a patch of a row left out is gone, an every-row patch stays."""
    where = {old: new for new, old in enumerate(rows)}
    out: list[Patch] = []
    for patch in patches:
        if patch.row is None:
            out.append(patch)
        elif patch.row in where:
            out.append(replace(patch, row=where[patch.row]))
    return tuple(out)


def _probed_layer(model: nn.Module) -> nn.Module:
    """The decoder layer whose attention says how heads are laid out: the first, or under layer surgery
    the first one not stood in for (``surgery.PassThrough`` has no attention)."""
    return next(layer for layer in decoder_layers(model) if not isinstance(layer, PassThrough))


def head_output_refusal(model: nn.Module) -> str | None:
    """Why a head's output cannot be isolated in ``model`` (None: it can)."""
    config = text_config(model)
    family = getattr(config, "model_type", type(model).__name__)
    if getattr(config, "pretraining_tp", 1) > 1 and getattr(config, "slow_but_exact", False):
        # Bloom then multiplies slices of the dense weight itself: the projection module never runs
        return f"{family} with slow_but_exact and pretraining_tp > 1 bypasses its output projection module"
    try:
        output_projection(attention_module(_probed_layer(model)))
    except RuntimeError as error:
        return f"{family}: {error}"
    return None


def head_layout(model: nn.Module) -> tuple[int, int]:
    """(query heads, head_dim) of ``model``'s attention, as its output projection sees them; ValueError
    for a family where one head's output cannot be isolated."""
    refusal = head_output_refusal(model)
    if refusal is not None:
        raise ValueError(f"head outputs cannot be read or patched: {refusal}")
    heads = num_heads(model)
    proj = output_projection(attention_module(_probed_layer(model)))
    width = getattr(proj, "in_features", None) or getattr(proj, "nx", None)  # Linear, or GPT-2's Conv1D
    if not isinstance(width, int) or width % heads:
        raise ValueError(f"head outputs cannot be read or patched: output projection width {width}, {heads} heads")
    return heads, width // heads


def check_sites(model: nn.Module, layers: Sequence[int], heads: Sequence[int] = ()) -> tuple[int, int] | None:
    """Refuse layers outside 0..L-1 and heads outside 0..H-1 with one clear line; the head layout when
    heads are named."""
    n = num_layers(model)
    bad = sorted({x for x in layers if not 0 <= x < n})
    if bad:
        raise ValueError(f"layers {bad} out of range for a model with {n} layers")
    if not heads:
        return None
    n_heads, head_dim = head_layout(model)
    bad = sorted({h for h in heads if not 0 <= h < n_heads})
    if bad:
        raise ValueError(f"heads {bad} out of range for a model with {n_heads} query heads")
    return n_heads, head_dim


def check_patches(model: nn.Module, patches: Sequence[Patch]) -> None:
    """Refuse patches that do not fit ``model``: layer or head out of range, vector of the wrong size,
    a head patch on a family whose head outputs cannot be isolated."""
    head_patches = [p for p in patches if isinstance(p, ReplaceHeadOutput)]
    layout = check_sites(model, [p.layer for p in patches], [p.head for p in head_patches])
    hidden_size = getattr(text_config(model), "hidden_size", None)
    for patch in patches:
        size = layout[1] if isinstance(patch, ReplaceHeadOutput) and layout is not None else hidden_size
        if size is not None and patch.vector.shape[0] != size:
            raise ValueError(f"{type(patch).__name__} vector has {patch.vector.shape[0]} values, expected {size}")
