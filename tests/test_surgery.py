"""Decoder-layer surgery: a stopped forward hands back the layer's input; a layer fed that input
with the layers below skipped gives the full forward's logits; the layers are put back after."""

from __future__ import annotations

import pytest
import torch

from icl_locate.core.models import load_model
from icl_locate.core.structure import decoder_layers
from icl_locate.core.surgery import LayerCall, feed_input, skip_layers_below, stop_before

FAMILIES = ["llama", "gemma3", "gpt2", "bloom", "gpt_neo"]


@pytest.mark.parametrize("family", FAMILIES)
@torch.no_grad()
def test_stopped_forward_returns_the_layer_input(family):
    lm = load_model(f"tiny:{family}")
    ids = torch.tensor([[1, 5, 9, 14, 3, 7]])  # [1, T]
    full = lm.model(input_ids=ids, output_hidden_states=True)
    for j in range(lm.info.num_layers):
        with stop_before(lm.model, j) as stopped:
            lm.model(input_ids=ids)
        assert stopped.hidden is not None
        torch.testing.assert_close(stopped.hidden, full.hidden_states[j], rtol=0, atol=0)


@pytest.mark.parametrize("family", FAMILIES)
@torch.no_grad()
def test_fed_input_with_layers_below_skipped_gives_the_full_logits(family):
    lm = load_model(f"tiny:{family}")
    ids = torch.tensor([[1, 5, 9, 14, 3, 7]])
    layers = list(decoder_layers(lm.model))
    kinds = []
    handle = layers[0].register_forward_hook(lambda module, args, output: kinds.append(isinstance(output, tuple)))
    full = lm.model(input_ids=ids, output_hidden_states=True)
    handle.remove()
    j = 2
    with feed_input(lm.model, j, lambda: full.hidden_states[j]), skip_layers_below(lm.model, j, kinds[0]):
        assert all(type(layer).__name__ == "PassThrough" for layer in decoder_layers(lm.model)[:j])
        logits = lm.model(input_ids=ids).logits
    torch.testing.assert_close(logits, full.logits)
    assert list(decoder_layers(lm.model)) == layers


def test_other_exceptions_pass_through_a_stop():
    lm = load_model("tiny:llama")
    with pytest.raises(ValueError), stop_before(lm.model, 1):
        raise ValueError("not ours")
    assert not decoder_layers(lm.model)[1]._forward_pre_hooks


def test_layer_call_names_positional_arguments():
    class Layer(torch.nn.Module):
        def forward(self, hidden_states, attention_mask=None, position_ids=None):
            return hidden_states

    call = LayerCall(Layer())
    h, m = torch.zeros(1, 2, 3), torch.ones(1, 2)
    hidden, kwargs = call.split((h, m), {"position_ids": 4})
    assert hidden is h and kwargs == {"attention_mask": m, "position_ids": 4}
    hidden, kwargs = call.split((), {"hidden_states": h})
    assert hidden is h and kwargs == {}
    assert call.hidden((), {"hidden_states": h}) is h
    args, kwargs = call.with_hidden((), {"hidden_states": h, "x": 1}, m)
    assert args == () and kwargs["hidden_states"] is m and kwargs["x"] == 1
