"""Training one single-layer LoRA adapter: AdamW steps over micro-batches, early stopping, the record.

Two ways to compute a micro-batch's loss, chosen by ``settings.reuse``:

* **plain** (``reuse=False``): the model's own forward and loss, every layer, every epoch;
  ``loss="full"`` with unbucketed batches is the paper's loss (every non-padding position,
  prompt included) computed as its code does (``lora_loss.plain_loss``).
* **reuse** (the default): the adapted layer's input is computed once and the layers above run
  from it (``lora_reuse``); same losses and gradients up to float rounding.

Sequences and batches: ``lora_batches``; losses and precision: ``lora_loss``.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from .lora_batches import MicroBatch, TrainingSequence, check_batching, epoch_steps, fixed_micro_batches
from .lora_loss import autocast_mode, plain_loss
from .lora_reuse import reused_activations


@dataclass
class TrainingRecord:
    train_loss: list[float]
    val_loss: list[float]
    best_val_loss: float
    train_tokens: int  # loss targets trained on, all epochs
    sequence_tokens: int  # tokens of the training sequences processed (padding not counted), all epochs
    train_seconds: float  # optimizer steps, the activation cache's forwards included
    val_seconds: float
    path: str  # "reuse" or "plain"
    cache_bytes: int = 0  # kept inputs of the adapted layer, in memory
    cache_disk_bytes: int = 0  # ... and in files, beyond the memory budget
    bytes_per_token: float | None = None  # activations autograd keeps per token (reuse path), measured

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def mean_val_loss(loss_fn, batches: Sequence[MicroBatch]) -> float:
    total = sum(loss_fn(mb, 1.0, False) for mb in batches)
    return total / max(1, sum(mb.tokens for mb in batches))


def train(
    peft_model,
    train_seqs: list[TrainingSequence],
    val_seqs: list[TrainingSequence],
    layer: int,
    pad_id: int,
    settings,
    log: Callable[[str], None] = lambda m: None,
) -> TrainingRecord:
    """AdamW on the adapter, early stopping on the validation loss (the best adapter is kept)."""
    check_batching(settings.reuse, settings.bucketing)
    device = next(peft_model.parameters()).device
    autocast = autocast_mode(settings.autocast, str(device))
    params = [p for p in peft_model.parameters() if p.requires_grad]
    optim = torch.optim.AdamW(params, lr=settings.lr)
    gen = torch.Generator().manual_seed(settings.seed)
    loss = settings.loss
    buckets = (
        fixed_micro_batches(train_seqs, settings.micro_batch, loss, pad_id, device) if settings.bucketing else None
    )
    val = fixed_micro_batches(
        val_seqs, settings.micro_batch, loss, pad_id, device, first_key=len(buckets) if buckets is not None else 0
    )  # keys after training's
    record = TrainingRecord([], [], math.inf, 0, 0, 0.0, 0.0, "reuse" if settings.reuse else "plain")
    best_state, bad_epochs = adapter_state(peft_model), 0
    with contextlib.ExitStack() as scope:
        reuse = None
        if settings.reuse:
            assert buckets is not None  # reuse needs fixed micro-batches (check_batching)
            reuse = scope.enter_context(
                reused_activations(peft_model, layer, buckets, val, settings.activation_mb, autocast, log)
            )
        if reuse is not None:
            record.train_seconds, record.cache_bytes = reuse.seconds, reuse.bytes
            record.cache_disk_bytes, record.bytes_per_token = reuse.disk_bytes, reuse.bytes_per_token

        def loss_fn(mb: MicroBatch, scale: float, backward: bool) -> float:
            if reuse is not None:
                return reuse.loss(mb, scale, backward)
            return plain_loss(peft_model, mb, scale, backward, autocast)

        for epoch in range(settings.max_epochs):
            peft_model.train()
            started = time.perf_counter()
            step_losses = []
            for step in epoch_steps(
                train_seqs, buckets, settings.batch_size, settings.micro_batch, loss, pad_id, device, gen
            ):
                optim.zero_grad()
                n_tokens = sum(mb.tokens for mb in step)
                step_losses.append(sum(loss_fn(mb, 1.0 / n_tokens, True) for mb in step) / n_tokens)
                record.train_tokens += n_tokens
                record.sequence_tokens += sum(int(mb.mask.sum()) for mb in step)
                optim.step()
            record.train_seconds += time.perf_counter() - started
            record.train_loss.append(sum(step_losses) / max(1, len(step_losses)))
            peft_model.eval()
            started = time.perf_counter()
            with torch.no_grad():
                val_loss = mean_val_loss(loss_fn, val)
            record.val_seconds += time.perf_counter() - started
            record.val_loss.append(val_loss)
            log(f"    epoch {epoch + 1}: train {record.train_loss[-1]:.4f}  val {val_loss:.4f}")
            if val_loss < record.best_val_loss - settings.threshold:
                record.best_val_loss, best_state, bad_epochs = val_loss, adapter_state(peft_model), 0
            else:
                bad_epochs += 1
                if bad_epochs >= settings.patience:
                    break
    load_adapter_state(peft_model, best_state)
    return record


def adapter_state(peft_model) -> dict:
    return {k: v.detach().clone() for k, v in peft_model.named_parameters() if v.requires_grad}


def load_adapter_state(peft_model, state: dict) -> None:
    with torch.no_grad():
        for k, v in peft_model.named_parameters():
            if k in state:
                v.copy_(state[k])
