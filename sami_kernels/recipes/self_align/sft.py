"""Supervised fine-tuning on (prompt, response) pairs with the fused log-prob kernels and sequence packing.

    loss = - sum over response tokens of log p(token | everything before it in its own sequence)
           / number of response tokens                       (the prompt is masked, no EOS target)

Sequences are tokenised as [BOS] + prompt + response (cut at `cutoff` tokens) and packed back to back into rows of
at most `pack_tokens` tokens with no padding inside a row; position ids restart at each sequence, which makes
transformers build a block-diagonal causal mask (and flash-attn run varlen), so no token sees another sequence.
Only the hidden states that predict response tokens reach the output head, through the fused kernels.

Each epoch visits the sequences in its own order, a permutation drawn from (seed, epoch) alone: optimiser steps mix
every source and type of prompt, and a run resumed from a checkpoint sees exactly the order an uninterrupted one sees.
The seed also initialises the LoRA (the checkpoint restores every random state after that).
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from tqdm.auto import tqdm

from ...engine.packed import Sequence, pack, packed_logprobs
from ..checkpoint import load_latest, save_checkpoint
from ..metrics import MetricsLog
from ..training import (
    LoRAConfig,
    OptimizerConfig,
    Processes,
    apply_update,
    build_optimizer,
    build_scheduler,
    load_model,
    restore_training_state,
    save_pretrained_atomic,
    trainable_state,
    training_state,
)


@dataclass
class SFTConfig:
    epochs: int = 1
    batch_sequences: int = 768  # sequences per optimiser step (the paper's global batch)
    pack_tokens: int = 2048  # tokens per packed row (one micro-batch)
    cutoff: int = 512  # tokens per sequence
    optimizer: OptimizerConfig = field(
        default_factory=lambda: OptimizerConfig(lr=4e-4, warmup_steps=100, schedule="linear")
    )
    lora: LoRAConfig | None = field(default_factory=LoRAConfig)  # None: full fine-tune
    checkpoint_every: int = 50
    precision: Literal["fp32", "bf16"] = "fp32"


def sft_train(
    out: Path,
    base_path: str,
    sequences: list[Sequence],
    config: SFTConfig,
    tokenizer,
    *,
    seed: int,
    show: bool,
    desc: str,
) -> Path:
    """SFT of the base model on the sequences; resumable from out/checkpoints; the model (or adapter) ends in
    out/model. Each optimiser step takes batch_sequences sequences (packed into micro-batch rows), and its loss is
    the mean over all of that step's response tokens: each row's sum is divided by the step's token count."""
    procs = Processes()
    if procs.world > 1:
        raise NotImplementedError("SELF-ALIGN's SFT stages run in one process here")
    final = out / "model"
    if final.exists():
        return final
    steps_per_epoch = math.ceil(len(sequences) / config.batch_sequences)
    total = steps_per_epoch * config.epochs
    torch.manual_seed(seed)
    model = load_model(base_path, device=procs.device, lora=config.lora, trainable=True).train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer(params, config.optimizer)
    scheduler = build_scheduler(optimizer, config.optimizer, total)
    checkpoint = load_latest(out / "checkpoints")
    done = restore_training_state(checkpoint, model, optimizer, scheduler)["step"] if checkpoint else 0
    log = MetricsLog(out / "metrics.jsonl", resume_step=checkpoint[0] if checkpoint else None)
    autocast = lambda: torch.autocast(procs.device.type, dtype=torch.bfloat16, enabled=config.precision == "bf16")  # noqa: E731
    for step in tqdm(range(done, total), desc=desc, unit="step", disable=not show, initial=done, total=total):
        epoch, index = divmod(step, steps_per_epoch)
        if step == done or index == 0:
            order = epoch_order(len(sequences), seed, epoch)
        start = index * config.batch_sequences
        chunk = [sequences[k] for k in order[start : start + config.batch_sequences]]
        count = sum(len(s.ids) - s.first_target for s in chunk)
        began, loss_sum = time.perf_counter(), 0.0
        for row in pack(chunk, config.pack_tokens):
            with autocast():
                logp_sum = packed_logprobs(model, row).sum()
            (-logp_sum / count).backward()
            loss_sum -= logp_sum.item()
        norm, lr = apply_update(params, optimizer, scheduler, config.optimizer.max_grad_norm)
        elapsed = time.perf_counter() - began
        log.log(
            {
                "kind": "train",
                "step": step + 1,
                "loss": loss_sum / count,
                "lr": lr,
                "grad_norm": norm,
                "tokens_per_s": sum(len(s.ids) for s in chunk) / elapsed,
            }
        )
        if (step + 1) % config.checkpoint_every == 0 and step + 1 < total:
            state = training_state(optimizer, scheduler, step=step + 1)
            save_checkpoint(out / "checkpoints", step + 1, trainable_state(model), state)
    log.close()
    return save_pretrained_atomic(model, tokenizer, final)


def epoch_order(count: int, seed: int, epoch: int) -> list[int]:
    """The order in which epoch `epoch` visits `count` sequences: a permutation that depends on (seed, epoch) only."""
    order = list(range(count))
    random.Random(f"{seed}/epoch {epoch}").shuffle(order)
    return order
