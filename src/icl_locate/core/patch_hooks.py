"""The hooks that carry out patches (``patches.py``) and readings (``record``).

``attention.prepare_model`` installs two hooks on the decoder body (the module that runs the
decoder layers). The forward pre-hook learns which absolute columns the forward covers and, only
while patches or a reading are active and touch those columns, registers hooks for that forward
alone: a forward pre-hook on each decoder layer concerned (its input is the hidden state at that
layer) and on the output projection of each attention concerned (its input is the heads' outputs
side by side). The forward hook, which runs even when the forward raises (``always_call``),
removes them. So a forward without patches or a reading costs two hook calls that return at once,
and the layers carry no hooks of ours between forwards.

Columns: a forward feeding T tokens covers the columns [start, start + T), where start is the width
of the attention mask it gets minus T: the 2D mask spans every column so far, cache included (what
every engine passes, and what ``ColumnMask`` counts). Without a mask, start is the cache's length
(0 without a cache). transformers 5.x hands the layers no ``cache_position``, and under
``ColumnDrop`` the caches of different layers differ in length, so the body's inputs are the one
place that knows. A patch or reading applies in a forward exactly when its column is in there.
"""

from __future__ import annotations

import contextlib
import contextvars
import inspect
from collections.abc import Callable, Iterable, Iterator, Sequence

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from .interventions import active, is_prepared
from .patches import AddHidden, Patch, ReplaceHeadOutput, check_sites, head_layout
from .structure import attention_module, decoder_body, decoder_layers, output_projection
from .surgery import LayerCall

CACHE_NAMES = ("cache", "past_key_values")  # transformers 5.x renames the argument model by model


class Recording:
    """What ``record`` read: ``hidden[(layer, position)]`` is the hidden state at that layer's input
    ([B, hidden_size], ``output_hidden_states[layer][:, position]``), ``heads[(layer, head, position)]``
    that head's output ([B, head_dim]). Values are detached copies, taken after the patches at the
    same place (what the model went on with); a column that several forwards process keeps the last."""

    def __init__(self, hidden_sites: Iterable[tuple[int, int]], head_sites: Iterable[tuple[int, int, int]]):
        self.hidden_sites = tuple(sorted({(int(a), int(b)) for a, b in hidden_sites}))
        self.head_sites = tuple(sorted({(int(a), int(b), int(c)) for a, b, c in head_sites}))
        if any(min(site) < 0 for site in self.hidden_sites + self.head_sites):
            raise ValueError("layers, heads and positions to read must be >= 0")
        self.hidden: dict[tuple[int, int], torch.Tensor] = {}
        self.heads: dict[tuple[int, int, int], torch.Tensor] = {}

    def wants_hidden(self, layer: int, window: range) -> bool:
        return any(site_layer == layer and p in window for site_layer, p in self.hidden_sites)

    def wants_heads(self, layer: int, window: range) -> bool:
        return any(site_layer == layer and p in window for site_layer, _, p in self.head_sites)

    def take_hidden(self, layer: int, hidden: torch.Tensor, window: range) -> None:
        """Keep the states at this layer's sites in ``window``; hidden: [B, T, d]."""
        for site_layer, p in self.hidden_sites:
            if site_layer == layer and p in window:
                self.hidden[(layer, p)] = hidden[:, p - window.start].detach().clone()  # [B, d]

    def take_heads(self, layer: int, heads: torch.Tensor, window: range) -> None:
        """Keep the head outputs at this layer's sites in ``window``; heads: [B, T, H, D]."""
        for site_layer, h, p in self.head_sites:
            if site_layer == layer and p in window:
                self.heads[(layer, h, p)] = heads[:, p - window.start, h].detach().clone()  # [B, D]


_RECORDINGS: contextvars.ContextVar[tuple[Recording, ...]] = contextvars.ContextVar("icl_locate_readings", default=())


@contextlib.contextmanager
def record(
    model: nn.Module, hidden: Iterable[tuple[int, int]] = (), heads: Iterable[tuple[int, int, int]] = ()
) -> Iterator[Recording]:
    """Within the block, read the hidden state at each (layer, position) of ``hidden`` and the output of
    each (layer, head, position) of ``heads`` whenever a forward of ``model`` processes that column
    (columns as fed, left padding included). Composes with ``intervene`` (patches, masks)."""
    if not is_prepared(model):
        raise RuntimeError("model is not prepared for interventions: call icl_locate.core.attention.prepare_model")
    recording = Recording(hidden, heads)
    layers = [site[0] for site in recording.hidden_sites + recording.head_sites]
    check_sites(model, layers, [h for _, h, _ in recording.head_sites])
    token = _RECORDINGS.set(_RECORDINGS.get() + (recording,))
    try:
        yield recording
    finally:
        _RECORDINGS.reset(token)


def forward_columns(inputs: dict) -> range:
    """The absolute columns a forward covers, from the decoder body's inputs by name."""
    fed = inputs.get("input_ids")
    fed = inputs.get("inputs_embeds") if fed is None else fed
    if fed is None:
        raise RuntimeError("a patched or read forward needs input_ids or inputs_embeds")
    length = fed.shape[1]
    mask = inputs.get("attention_mask")
    if isinstance(mask, torch.Tensor):  # [B, past + T] (or a 4D [B, 1, T, past + T])
        start = mask.shape[-1] - length
    else:
        cache = next((inputs[name] for name in CACHE_NAMES if inputs.get(name) is not None), None)
        start = cache.get_seq_length() if cache is not None else 0
    if start < 0:
        raise RuntimeError(f"attention mask of {start + length} columns for {length} tokens")
    return range(start, start + length)


def write_patches(x: torch.Tensor, patches: Sequence[Patch], window: range) -> torch.Tensor:
    """A copy of ``x`` ([B, T, d], or [B, T, H, D] for head patches) with ``patches`` written at their
    columns, in the order given."""
    out = x.clone()
    for patch in patches:
        if patch.row is not None and patch.row >= x.shape[0]:
            raise ValueError(f"{type(patch).__name__} for row {patch.row}, the batch has {x.shape[0]} rows")
        rows = slice(None) if patch.row is None else patch.row
        site = (rows, patch.position - window.start)
        if isinstance(patch, ReplaceHeadOutput):
            site = site + (patch.head,)
        vector = patch.vector.to(device=out.device, dtype=out.dtype)  # [d] or [D]
        if isinstance(patch, AddHidden):
            out[site] = out[site] + vector
        else:
            out[site] = vector
    return out


def _hidden_hook(layer: int, patches: list[Patch], readers: list[Recording], window: range) -> Callable:
    def hook(module, args, kwargs):
        call = LayerCall(module)
        hidden = call.hidden(args, kwargs)  # [B, T, d]
        new = write_patches(hidden, patches, window) if patches else hidden
        for recording in readers:
            recording.take_hidden(layer, new, window)
        return call.with_hidden(args, kwargs, new) if patches else None

    return hook


def _head_hook(layer: int, patches: list[Patch], readers: list[Recording], window: range, n_heads: int) -> Callable:
    def hook(proj, args):
        context = args[0]  # [B, T, H * D]: the heads' outputs side by side
        b, t, width = context.shape
        heads = context.reshape(b, t, n_heads, width // n_heads)  # [B, T, H, D]
        if patches:
            heads = write_patches(heads, patches, window)
        for recording in readers:
            recording.take_heads(layer, heads, window)
        return (heads.reshape(b, t, width),) + tuple(args[1:]) if patches else None

    return hook


def _per_layer(patches: Sequence[Patch], window: range) -> dict[int, list[Patch]]:
    out: dict[int, list[Patch]] = {}
    for patch in patches:
        if patch.position in window:
            out.setdefault(patch.layer, []).append(patch)
    return out


def install_patch_hooks(model: nn.Module) -> None:
    """Hook ``model``'s decoder body so that active patches and readings reach the layers (see above)."""
    body = decoder_body(model)
    layers = decoder_layers(model)
    names = list(inspect.signature(body.forward).parameters)
    handles: list[RemovableHandle] = []

    def begin(module, args, kwargs):
        patches, readers = active().patches, _RECORDINGS.get()
        if not patches and not readers:
            return None
        window = forward_columns({**dict(zip(names, args)), **kwargs})
        hidden = _per_layer([p for p in patches if not isinstance(p, ReplaceHeadOutput)], window)
        heads = _per_layer([p for p in patches if isinstance(p, ReplaceHeadOutput)], window)
        n_heads = None
        for layer in range(len(layers)):  # layers looked up now: a surgery may have swapped some
            hidden_readers = [r for r in readers if r.wants_hidden(layer, window)]
            if layer in hidden or hidden_readers:
                hook = _hidden_hook(layer, hidden.get(layer, []), hidden_readers, window)
                handles.append(layers[layer].register_forward_pre_hook(hook, with_kwargs=True))
            head_readers = [r for r in readers if r.wants_heads(layer, window)]
            if layer in heads or head_readers:
                n_heads = n_heads or head_layout(model)[0]
                proj = output_projection(attention_module(layers[layer]))
                handles.append(
                    proj.register_forward_pre_hook(
                        _head_hook(layer, heads.get(layer, []), head_readers, window, n_heads)
                    )
                )
        return None

    def end(module, args, kwargs, output):
        for handle in handles:
            handle.remove()
        handles.clear()
        return None

    body.register_forward_pre_hook(begin, with_kwargs=True)
    body.register_forward_hook(end, with_kwargs=True, always_call=True)
