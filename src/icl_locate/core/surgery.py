"""Raw decoder-layer surgery: stop a forward before a layer, feed a layer another input, skip layers.

The engines and the LoRA training run the model's own forward (embeddings, masks, rotary tables,
attention hooks) and change only what one decoder layer receives or whether it runs; these are
the hooks and stand-ins they do it with. A decoder layer is called with its hidden states first
(positionally or as a keyword) and the rest as the model's loop passes them; ``LayerCall`` names
every argument by the layer's signature, so a hook needs not know how the loop called it.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

from .structure import decoder_layers


class StopForward(Exception):
    """Raised by a pre-hook to end a forward pass before a layer (``stop_before`` swallows it)."""


class LayerCall:
    """A decoder layer's call arguments by name: its hidden states, and every other argument as a keyword."""

    def __init__(self, layer: nn.Module):
        self.kind = type(layer).__name__
        self.names = list(inspect.signature(layer.forward).parameters)

    def hidden(self, args: tuple, kwargs: dict) -> torch.Tensor:
        """The hidden states the layer was called with ([B, T, d])."""
        return args[0] if args else kwargs[self.names[0]]

    def split(self, args: tuple, kwargs: dict) -> tuple[torch.Tensor, dict]:
        """(hidden states, every other argument by name): positional arguments become keywords."""
        if len(args) > len(self.names):
            raise RuntimeError(f"{self.kind} got {len(args)} positional arguments")
        kwargs = dict(kwargs, **dict(zip(self.names[1:], args[1:])))
        hidden = args[0] if args else kwargs.pop(self.names[0])
        return hidden, kwargs

    def with_hidden(self, args: tuple, kwargs: dict, hidden: torch.Tensor) -> tuple[tuple, dict]:
        """The same call with ``hidden`` in place of the hidden states, every other argument as it came."""
        if args:
            return (hidden,) + tuple(args[1:]), kwargs
        return args, dict(kwargs, **{self.names[0]: hidden})


class stop_before:
    """Within the block, a forward pass ends when it reaches decoder layer ``layer``; ``hidden`` is
    then that layer's input ([B, T, d], detached). Only ``StopForward`` is swallowed."""

    def __init__(self, model: nn.Module, layer: int):
        self.layer = decoder_layers(model)[layer]
        self.call = LayerCall(self.layer)
        self.hidden: torch.Tensor | None = None

    def __enter__(self) -> stop_before:
        def stop(module, args, kwargs):
            self.hidden = self.call.hidden(args, kwargs).detach()
            raise StopForward

        self.handle = self.layer.register_forward_pre_hook(stop, with_kwargs=True)
        return self

    def __exit__(self, kind, value, tb) -> bool:
        self.handle.remove()
        return kind is StopForward


@contextmanager
def feed_input(model: nn.Module, layer: int, hidden: Callable[[], torch.Tensor]) -> Iterator[None]:
    """Within the block, decoder layer ``layer`` runs on ``hidden()`` instead of what reached it."""
    module = decoder_layers(model)[layer]
    call = LayerCall(module)

    def feed(module, args, kwargs):
        return call.with_hidden(args, kwargs, hidden())

    handle = module.register_forward_pre_hook(feed, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


class output_kind:
    """Within the block, learn from the forwards that run whether the model's decoder layers return a
    tuple or the tensor alone (``returns_tuple``; None until a forward reaches them): what a
    ``PassThrough`` standing in for one must return."""

    def __init__(self, model: nn.Module):
        self.layer = decoder_layers(model)[0]
        self.returns_tuple: bool | None = None

    def __enter__(self) -> output_kind:
        def seen(module, args, output):
            self.returns_tuple = isinstance(output, tuple)

        self.handle = self.layer.register_forward_hook(seen)
        return self

    def __exit__(self, kind, value, tb) -> bool:
        self.handle.remove()
        return False


class PassThrough(nn.Module):
    """Stands in for a decoder layer whose output is not needed: it returns its input."""

    def __init__(self, layer: nn.Module, returns_tuple: bool):
        super().__init__()
        self.returns_tuple = returns_tuple
        for name in ("attention_type", "layer_idx", "is_sliding"):  # attributes a model's loop may read
            if hasattr(layer, name):
                setattr(self, name, getattr(layer, name))

    def forward(self, hidden_states, *args, **kwargs):
        return (hidden_states,) if self.returns_tuple else hidden_states


@contextmanager
def skip_layers_below(model: nn.Module, layer: int, returns_tuple: bool) -> Iterator[None]:
    """Within the block, decoder layers below ``layer`` are ``PassThrough``s (``returns_tuple``: as the
    model's layers return: a tuple or the tensor alone); the originals are put back after."""
    layers = decoder_layers(model)
    originals = list(layers[:layer])
    for i, original in enumerate(originals):
        layers[i] = PassThrough(original, returns_tuple)
    try:
        yield
    finally:
        for i, original in enumerate(originals):
            layers[i] = original
