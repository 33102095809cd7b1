"""Single-layer LoRA: the adapter sits on exactly one module, only it trains, base weights stay put."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from icl_locate.cli import main
from icl_locate.core.models import load_model
from icl_locate.core.prompts import Example
from icl_locate.engines.calibrate import Calibrator
from icl_locate.engines.fast import FastEngine
from icl_locate.engines.request import EngineRequest
from icl_locate.experiments import lora as lora_module
from icl_locate.experiments.lora import (
    LoraData,
    LoraSettings,
    LoraWorker,
    attach_adapter,
    evaluate_zero_shot,
    lora_sweep,
    lora_unit_id,
    output_projection_name,
    resolve_autocast,
)
from icl_locate.experiments.lora_batches import encode_pairs, fixed_micro_batches, make_micro_batch
from icl_locate.experiments.lora_loss import ChunkedHeadLoss, plain_loss
from icl_locate.experiments.lora_reuse import ReusedActivations
from icl_locate.experiments.lora_train import mean_val_loss, train
from icl_locate.results.store import Store
from icl_locate.util.errors import UserError

EXPECTED = {
    "llama": "model.layers.1.self_attn.o_proj",
    "gpt_neo": "transformer.h.1.attn.attention.out_proj",
    "gemma3": "model.layers.1.self_attn.o_proj",
    "bloom": "transformer.h.1.self_attention.dense",
    "gpt2": "transformer.h.1.attn.c_proj",
}
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
    seqs = encode_pairs(lm.tokenizer, PAIRS)
    mb = make_micro_batch(seqs[:4], "full", lm.tokenizer.pad_token_id, "cpu")  # one training step
    optim = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=settings.lr)
    peft_model.train()
    plain_loss(peft_model, mb, 1.0 / mb.tokens, backward=True)
    optim.step()
    changed = [n for n, p in peft_model.named_parameters() if p.requires_grad and not torch.equal(p, lora_params[n])]
    assert changed and all(target in n for n in changed)
    peft_model.unload()
    after = lm.model.state_dict()
    assert set(after) == set(base_before)
    assert all(torch.equal(after[k], base_before[k]) for k in base_before)


def test_mini_sweep_end_to_end(tmp_path, data_dir):
    lm = load_model("tiny:llama")
    store = Store(tmp_path / "s.sqlite", dict(model="tiny:llama"))
    settings = LoraSettings(batch_size=8, micro_batch=4, max_epochs=2, train_size=16, lr=1e-3)
    logged: list[str] = []
    results = lora_sweep(
        lm, str(data_dir), "fra-eng", [0, 3], settings, 2, tmp_path / "adapters", store=store, log=logged.append
    )
    assert [r["layer"] for r in results] == [0, 3]
    assert len([line for line in logged if line.startswith("evaluation engine: ")]) == 1  # measured once, said once
    assert all((tmp_path / "adapters" / f"layer{layer:02d}" / "adapter_config.json").exists() for layer in (0, 3))
    assert all(len(r["curve"]["val_loss"]) == len(r["curve"]["train_loss"]) >= 1 for r in results)
    again = lora_sweep(
        lm, str(data_dir), "fra-eng", [0, 3], settings, 2, tmp_path / "adapters", store=store, log=lambda m: None
    )
    assert again == []  # finished layers are skipped
    from icl_locate.results.report import build_report

    page = build_report(store, tmp_path / "rep", n_boot=10).read_text()
    assert "lora_fra-eng.png" in page


def test_the_measured_evaluation_engine_decodes_with_the_adapter_in_place(data_dir, tmp_path, monkeypatch):
    """The worker measures its engine at the first unit, the adapter in place (PEFT puts it into the base model,
    which the engine runs): its generations are the PEFT model's own, and once the adapter is unloaded the
    base model's again. Forced to the tree engine and the int8 screen: not the plain comparison's engine."""
    monkeypatch.setenv("ICL_LOCATE_CACHE", str(tmp_path))
    forced = EngineRequest(engine="tree", head="int8", draft_tokens=0)
    monkeypatch.setattr(lora_module, "Calibrator", lambda model, tokenizer: Calibrator(model, tokenizer, forced))
    lm = load_model("tiny:llama")
    settings = LoraSettings(train_size=8, val_size=4)
    data = LoraData.load(str(data_dir), "fra-eng", settings, 4)
    base = evaluate_zero_shot(FastEngine(lm.model, lm.tokenizer), lm.tokenizer, data.test)[1]
    worker = LoraWorker(lm, data)
    peft_model, _ = attach_adapter(lm.model, 1, settings)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:  # a fresh adapter adds zero: give it weights that change the generations
                p.normal_(0, 1.0)
    peft_model.eval()
    try:
        measured = evaluate_zero_shot(worker.evaluation_engine(), lm.tokenizer, data.test)[1]
        plain = evaluate_zero_shot(FastEngine(peft_model, lm.tokenizer), lm.tokenizer, data.test)[1]
    finally:
        peft_model.unload()
    after = evaluate_zero_shot(worker.evaluation_engine(), lm.tokenizer, data.test)[1]
    assert measured == plain and measured != base and after == base
    assert worker.choices is not None and (worker.choices.engine, worker.choices.head) == ("tree", "int8")


@pytest.mark.parametrize("layers,train_size,message", [([7], 16, "out of range"), ([0], 900, "--train-size")])
def test_bad_input(tmp_path, data_dir, layers, train_size, message):
    lm = load_model("tiny:llama")
    with pytest.raises(UserError, match=message):
        lora_sweep(
            lm, str(data_dir), "fra-eng", layers, LoraSettings(train_size=train_size), 2, tmp_path, log=lambda m: None
        )


# --------------------------------------------------------------------------- activation reuse and losses

REUSE_FAMILIES = ["llama", "gemma3", "gpt_neo", "bloom"]


def _grads(peft_model) -> dict:
    return {n: p.grad.detach().clone() for n, p in peft_model.named_parameters() if p.requires_grad}


def test_answer_positions_are_the_target_tokens():
    lm = load_model("tiny:llama")
    for ex, seq in zip(PAIRS, encode_pairs(lm.tokenizer, PAIRS)):
        answer = lm.tokenizer.decode(list(seq.ids[seq.answer_start : -1]))
        assert answer.strip() == ex.target and seq.ids[-1] == lm.tokenizer.eos_token_id
        assert list(seq.targets("full")) == list(range(1, len(seq.ids)))


@pytest.mark.parametrize("family", REUSE_FAMILIES)
@pytest.mark.parametrize("layer", [0, 2])
@pytest.mark.parametrize("loss", ["answer", "full"])
def test_reused_activations_give_the_plain_loss_and_gradients(family, layer, loss):
    """From the kept input of layer l with the head at the loss positions only, in chunks: the
    model's own loss (answer-only = its loss with the other labels masked) and the same gradients."""
    lm = load_model(f"tiny:{family}")
    settings = LoraSettings(dropout=0.0)
    peft_model, _ = attach_adapter(lm.model, layer, settings)
    try:
        with torch.no_grad():  # a non-zero adapter, so that gradients reach both of its matrices
            for p in peft_model.parameters():
                if p.requires_grad:
                    p.normal_(0, 0.05)
        seqs = encode_pairs(lm.tokenizer, PAIRS)
        batches = fixed_micro_batches(seqs, 5, loss, lm.tokenizer.pad_token_id, "cpu")
        peft_model.train()
        plain = [plain_loss(peft_model, mb, 1.0 / mb.tokens, True) for mb in batches]
        plain_grads = _grads(peft_model)
        peft_model.zero_grad()
        reuse = ReusedActivations(peft_model.get_base_model(), layer)
        reuse.fill(batches)
        assert reuse.bytes > 0
        with reuse.running():
            reused = [reuse.loss(mb, 1.0 / mb.tokens, True) for mb in batches]
        for a, b in zip(plain, reused):
            assert a == pytest.approx(b, rel=1e-5)
        for name, grad in _grads(peft_model).items():
            torch.testing.assert_close(grad, plain_grads[name], rtol=1e-4, atol=1e-6)
        assert all(g.abs().sum() > 0 for g in plain_grads.values())
    finally:
        peft_model.unload()


@pytest.mark.parametrize("family", ["llama", "gemma3", "bloom"])
def test_pieces_within_an_activation_budget_give_the_whole_micro_batch(family):
    """A micro-batch too big for the activation budget runs in row pieces: same loss sum, same
    gradients; the measured bytes a token grow with the layers that run."""
    lm = load_model(f"tiny:{family}")
    peft_model, _ = attach_adapter(lm.model, 0, LoraSettings(dropout=0.0))
    try:
        with torch.no_grad():
            for p in peft_model.parameters():
                if p.requires_grad:
                    p.normal_(0, 0.05)
        seqs = encode_pairs(lm.tokenizer, PAIRS)
        batches = fixed_micro_batches(seqs, 6, "answer", lm.tokenizer.pad_token_id, "cpu")
        results = []
        for budget in (None, 1):
            peft_model.zero_grad()
            reuse = ReusedActivations(peft_model.get_base_model(), 0, activation_bytes=budget)
            reuse.fill(batches)
            with reuse.running():
                per_token = reuse.measure(batches[-1])
                assert [reuse.rows_per_piece(mb) for mb in batches] == ([6, 6] if budget is None else [1, 1])
                losses = [reuse.loss(mb, 1.0 / mb.tokens, True) for mb in batches]
            results.append((losses, _grads(peft_model), per_token))
        (whole, whole_grads, per_token), (pieces, piece_grads, _) = results
        assert pieces == pytest.approx(whole, rel=1e-5)
        for name, grad in whole_grads.items():
            torch.testing.assert_close(piece_grads[name], grad, rtol=1e-4, atol=1e-6)
    finally:
        peft_model.unload()
    peft_model, _ = attach_adapter(lm.model, 2, LoraSettings(dropout=0.0))
    try:
        upper = ReusedActivations(peft_model.get_base_model(), 2)
        upper.fill(batches[-1:])
        with upper.running():
            assert 0 < upper.measure(batches[-1]) < per_token
    finally:
        peft_model.unload()


def test_inputs_beyond_the_memory_budget_go_to_files_with_the_same_losses():
    lm = load_model("tiny:gemma3")
    peft_model, _ = attach_adapter(lm.model, 1, LoraSettings(dropout=0.0))
    try:
        seqs = encode_pairs(lm.tokenizer, PAIRS)
        batches = fixed_micro_batches(seqs, 4, "answer", lm.tokenizer.pad_token_id, "cpu")
        losses, grads = [], []
        for memory_bytes in (None, 0):
            peft_model.zero_grad()
            reuse = ReusedActivations(peft_model.get_base_model(), 1)
            reuse.fill(batches, memory_bytes=memory_bytes)
            with reuse.running():
                losses.append([reuse.loss(mb, 1.0, True) for mb in batches])
            grads.append(_grads(peft_model))
        files = list(reuse.spilled.values())
        assert (reuse.bytes, len(files)) == (0, len(batches)) and reuse.disk_bytes > 0
        assert all(f.exists() for f in files)
        reuse.close()
        assert not any(f.exists() for f in files)
        assert losses[1] == pytest.approx(losses[0], rel=1e-6)
        for name, grad in grads[0].items():
            torch.testing.assert_close(grads[1][name], grad)
    finally:
        peft_model.unload()


@pytest.mark.parametrize("softcap", [None, 5.0])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_head_loss_equals_autograd(softcap, bias, dtype):
    """The written-out head loss and gradient == autograd through head, float, softcap and
    cross-entropy, whatever the chunking (11 positions in chunks of 4, 4, 3)."""
    torch.manual_seed(0)
    head = nn.Linear(16, 50, bias=bias).to(dtype)
    states = (torch.randn(11, 16) * 3).to(dtype)
    targets = torch.randint(0, 50, (11,))
    x = states.clone().requires_grad_(True)
    logits = head(x).float()
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    expected = F.cross_entropy(logits, targets, reduction="sum")
    (expected * 0.25).backward()
    head_loss = ChunkedHeadLoss(head, softcap, chunk_rows=4)
    assert [len(c) for c in head_loss.chunks(11)] == [4, 4, 3]
    total, grad = head_loss(states, targets, 0.25, backward=True)
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-3)
    assert total == pytest.approx(float(expected.detach()), rel=tol["rtol"])
    torch.testing.assert_close(grad.float(), x.grad.float(), **tol)
    assert head_loss(states, targets, 1.0, backward=False)[1] is None
    with pytest.raises(UserError, match="not a Linear"):
        ChunkedHeadLoss(nn.Sequential(head), softcap, chunk_rows=4)


@pytest.mark.parametrize("family", ["llama", "gemma3", "gpt_neo"])
def test_training_with_reuse_equals_plain_training(family):
    """Same micro-batches, same order: the losses per epoch and the adapter after training agree."""
    lm = load_model(f"tiny:{family}")
    seqs = encode_pairs(lm.tokenizer, PAIRS)
    outcomes = []
    for reuse in (False, True):
        settings = LoraSettings(
            dropout=0.0, lr=1e-2, batch_size=4, micro_batch=2, max_epochs=3, patience=5, reuse=reuse
        )
        peft_model, _ = attach_adapter(lm.model, 1, settings)
        try:
            record = train(peft_model, seqs[:8], seqs[8:], 1, lm.tokenizer.pad_token_id, settings)
            state = {n: p.detach().clone() for n, p in peft_model.named_parameters() if p.requires_grad}
        finally:
            peft_model.unload()
        outcomes.append((record, state))
    (plain, plain_state), (reused, reused_state) = outcomes
    assert reused.path == "reuse" and plain.path == "plain" and reused.cache_bytes > 0
    assert reused.train_loss == pytest.approx(plain.train_loss, rel=1e-4)
    assert reused.val_loss == pytest.approx(plain.val_loss, rel=1e-4)
    assert (reused.train_tokens, reused.sequence_tokens) == (plain.train_tokens, plain.sequence_tokens)
    for name, value in plain_state.items():
        torch.testing.assert_close(reused_state[name], value, rtol=1e-3, atol=1e-5)
    assert any(not torch.equal(v, torch.zeros_like(v)) for v in plain_state.values())


def test_bucketed_batches_give_the_unpadded_loss():
    """Padding never counts: the loss over similar-length micro-batches equals one sequence at a time."""
    lm = load_model("tiny:llama")
    peft_model, _ = attach_adapter(lm.model, 1, LoraSettings(dropout=0.0))
    try:
        peft_model.eval()
        seqs = encode_pairs(lm.tokenizer, PAIRS)
        pad = lm.tokenizer.pad_token_id
        loss_fn = lambda mb, scale, backward: plain_loss(peft_model, mb, scale, backward)  # noqa: E731
        with torch.no_grad():
            one_by_one = mean_val_loss(loss_fn, [make_micro_batch([s], "answer", pad, "cpu") for s in seqs])
            bucketed = mean_val_loss(loss_fn, fixed_micro_batches(seqs, 4, "answer", pad, "cpu"))
        assert bucketed == pytest.approx(one_by_one, rel=1e-5)
    finally:
        peft_model.unload()


def test_reuse_refuses_a_model_whose_logits_it_would_get_wrong():
    """A model whose own forward does more than head(last hidden state) (here: doubles its loss, as a
    logit scale would change it) is caught before training."""
    lm = load_model("tiny:llama")
    settings = LoraSettings(dropout=0.0, max_epochs=1)
    peft_model, _ = attach_adapter(lm.model, 1, settings)
    original = lm.model.forward

    def doubled(*args, **kwargs):
        out = original(*args, **kwargs)
        out.loss = out.loss * 2
        return out

    lm.model.forward = doubled
    try:
        seqs = encode_pairs(lm.tokenizer, PAIRS)
        with pytest.raises(UserError, match="--no-reuse"):  # one line from the CLI: a path this model can't take
            train(peft_model, seqs[:4], seqs[4:8], 1, lm.tokenizer.pad_token_id, settings)
    finally:
        del lm.model.forward
        peft_model.unload()


def test_preset_paper_is_in_the_stored_run_config(tmp_path, data_dir):
    store = tmp_path / "s.sqlite"
    code = main(
        [
            "lora-sweep",
            "--model",
            "tiny:llama",
            "--preset",
            "paper",
            "--layers",
            "1",
            "--train-size",
            "8",
            "--val-size",
            "4",
            "--epochs",
            "1",
            "--n-test",
            "2",
            "--micro-batch",
            "4",
            "--out-dir",
            str(tmp_path / "out"),
            "--store",
            str(store),
            "--data-dir",
            str(data_dir),
        ]
    )
    assert code == 0
    with Store(store, create=False) as s:
        config = s.runs()[-1]["config"]
        engines = s.runs()[-1]["provenance"]["engines"]
        result = s.lora_results()[0]
    assert len(engines) == 1 and engines[0]["engine"] in ("fast", "tree") and engines[0]["hardware"]["cpu"]
    assert config["preset"] == "paper" and config["loss"] == "full" and config["autocast"] == "off"  # auto on a CPU
    assert (
        config["r"],
        config["alpha"],
        config["dropout"],
        config["lr"],
        config["batch_size"],
        config["patience"],
        config["threshold"],
        config["val_size"],
        config["train_size"],
    ) == (8, 32, 0.05, 1e-4, 32, 5, 0.01, 4, 8)
    assert result["train_tokens"] > 0 and result["train_seconds"] > 0 and result["seconds"] > 0


def test_bad_lora_options(tmp_path, data_dir, capsys):
    base = [
        "lora-sweep",
        "--model",
        "tiny:llama",
        "--layers",
        "1",
        "--out-dir",
        str(tmp_path),
        "--data-dir",
        str(data_dir),
    ]
    assert main(base + ["--no-bucketing"]) == 2
    assert "needs fixed micro-batches" in capsys.readouterr().err
    assert main(base + ["--loss", "tokens"]) == 2
    assert "invalid choice" in capsys.readouterr().err


def test_unit_ids_of_earlier_versions_are_kept():
    """The settings added later (autocast off, activation budget, reuse) leave the ids of earlier stores
    alone, so a sweep resumes them (ids as the code before these settings computed them)."""
    curve = resolve_autocast(LoraSettings(train_size=400, val_size=64, max_epochs=8, activation_mb=64), "cpu")
    assert lora_unit_id("fra-eng", 3, curve, 64) == "lora-5531cdff77ae"
    old = LoraSettings(loss="full", bucketing=False, reuse=False, autocast="off")
    assert lora_unit_id("fra-eng", 3, old, None) == "lora-8016f40bb37a"
    assert lora_unit_id("fra-eng", 3, replace(curve, autocast="bf16"), 64) != "lora-5531cdff77ae"
    with pytest.raises(UserError, match="--autocast"):  # a mode it does not know is not run as float32
        resolve_autocast(LoraSettings(autocast="fp8"), "cpu")
    assert resolve_autocast(LoraSettings(), "cuda").autocast == (
        "bf16" if not torch.cuda.is_available() or torch.cuda.is_bf16_supported() else "off"
    )


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_bf16_autocast_training(family):
    """Under ``autocast="bf16"`` the matmuls run in bfloat16 (seen at the adapted projection), the
    reuse path still equals the plain path, and the losses stay near float32's without equalling them."""
    lm = load_model(f"tiny:{family}")
    seqs = encode_pairs(lm.tokenizer, PAIRS)
    records, dtypes = {}, set()
    for autocast, reuse in (("off", True), ("bf16", False), ("bf16", True)):
        settings = LoraSettings(
            dropout=0.0, lr=1e-2, batch_size=4, micro_batch=2, max_epochs=2, patience=5, reuse=reuse, autocast=autocast
        )
        peft_model, target = attach_adapter(lm.model, 1, settings)
        handle = (
            peft_model.get_base_model()
            .get_submodule(target)
            .register_forward_hook(lambda module, args, output, mode=autocast: dtypes.add((mode, output.dtype)))
        )
        try:
            records[autocast, reuse] = train(peft_model, seqs[:8], seqs[8:], 1, lm.tokenizer.pad_token_id, settings)
        finally:
            handle.remove()
            peft_model.unload()
    assert dtypes == {("off", torch.float32), ("bf16", torch.bfloat16)}
    fp32, plain, reused = records["off", True], records["bf16", False], records["bf16", True]
    assert reused.val_loss == pytest.approx(plain.val_loss, rel=1e-2)
    assert reused.val_loss == pytest.approx(fp32.val_loss, rel=5e-2) and reused.val_loss != fp32.val_loss
