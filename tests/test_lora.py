"""Single-layer LoRA: the adapter sits on exactly one module, only it trains, base weights stay put."""

from __future__ import annotations

import pytest
import torch

from icl_locate.util.errors import UserError
from icl_locate.experiments.lora import LoraSettings, _batch, attach_adapter, encode_training_pairs, lora_sweep, \
    output_projection_name
from icl_locate.core.models import load_model
from icl_locate.core.prompts import Example

EXPECTED = {"llama": "model.layers.1.self_attn.o_proj", "gpt_neo": "transformer.h.1.attn.attention.out_proj",
            "gemma3": "model.layers.1.self_attn.o_proj", "bloom": "transformer.h.1.self_attention.dense",
            "gpt2": "transformer.h.1.attn.c_proj"}
PAIRS = [Example(str(i), f"phrase {i} en francais", f"sentence {i} in english") for i in range(12)]


@pytest.mark.parametrize("family", list(EXPECTED))
def test_one_layer_adapter_trains_alone(family):
    lm = load_model(f"tiny:{family}")
    assert output_projection_name(lm.model, 1) == EXPECTED[family]
    base_before = {k: v.clone() for k, v in lm.model.state_dict().items()}
    settings = LoraSettings(batch_size=4, micro_batch=2, max_epochs=1, lr=1e-2)
    peft_model, target = attach_adapter(lm.model, 1, settings)
    lora_params = {n: p.detach().clone() for n, p in peft_model.named_parameters() if p.requires_grad}
    assert lora_params and all(".lora_" in n and target in n for n in lora_params)
    seqs = encode_training_pairs(lm.tokenizer, PAIRS)
    ids, mask, labels = _batch(seqs[:4], lm.tokenizer.pad_token_id, "cpu")  # one training step
    optim = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=settings.lr)
    peft_model.train()
    peft_model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
    optim.step()
    changed = [n for n, p in peft_model.named_parameters() if p.requires_grad and not torch.equal(p, lora_params[n])]
    assert changed and all(target in n for n in changed)
    peft_model.unload()
    after = lm.model.state_dict()
    assert set(after) == set(base_before)
    assert all(torch.equal(after[k], base_before[k]) for k in base_before)


def test_mini_sweep_end_to_end(tmp_path, data_dir):
    from icl_locate.results.store import Store

    lm = load_model("tiny:llama")
    store = Store(tmp_path / "s.sqlite", dict(model="tiny:llama"))
    settings = LoraSettings(batch_size=8, micro_batch=4, max_epochs=2, train_size=16, lr=1e-3)
    results = lora_sweep(lm, str(data_dir), "fra-eng", [0, 3], settings, 2, tmp_path / "adapters", store=store,
                         log=lambda m: None)
    assert [r["layer"] for r in results] == [0, 3]
    assert all((tmp_path / "adapters" / f"layer{l:02d}" / "adapter_config.json").exists() for l in (0, 3))
    assert all(len(r["curve"]["val_loss"]) == len(r["curve"]["train_loss"]) >= 1 for r in results)
    again = lora_sweep(lm, str(data_dir), "fra-eng", [0, 3], settings, 2, tmp_path / "adapters", store=store,
                       log=lambda m: None)
    assert again == []  # finished layers are skipped
    from icl_locate.results.report import build_report

    page = build_report(store, tmp_path / "rep", n_boot=10).read_text()
    assert "lora_fra-eng.png" in page


@pytest.mark.parametrize("layers,train_size,message", [([7], 16, "out of range"), ([0], 900, "--train-size")])
def test_bad_input(tmp_path, data_dir, layers, train_size, message):
    lm = load_model("tiny:llama")
    with pytest.raises(UserError, match=message):
        lora_sweep(lm, str(data_dir), "fra-eng", layers, LoraSettings(train_size=train_size), 2, tmp_path,
                   log=lambda m: None)
