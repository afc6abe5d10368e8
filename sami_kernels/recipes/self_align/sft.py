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

Under torchrun (distributed: ddp or fsdp, training.py) process r takes every world-th sequence of a step, r first,
and scales its rows' losses by world, so that the averaged gradient is the one-process gradient. Every process runs
as many rows as the busiest one (an idle one scores a sequence with weight 0): under fsdp each forward and backward
is a collective.
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
from ..checkpoint import load_latest
from ..metrics import MetricsLog
from ..training import (
    LoRAConfig,
    ModelCall,
    OptimizerConfig,
    Processes,
    Trainable,
    accumulating,
    apply_update,
    build_optimizer,
    build_scheduler,
    distribute,
    load_model,
    restore_training_state,
    save_pretrained_atomic,
    save_training_checkpoint,
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
    checkpoint_every: int = 50  # steps are many and short (a 7B checkpoint takes longer than a step)
    checkpoint_hash: Literal["all", "small", "none"] = "small"  # SHA-256 of checkpoint files (checkpoint.py)
    precision: Literal["fp32", "bf16"] = "fp32"  # bf16: autocast (over the weights in model_dtype)
    master_weights: bool = True  # with model_dtype bfloat16: the optimiser steps fp32 copies (training.py)
    gradient_checkpointing: bool = False
    distributed: Literal["ddp", "fsdp"] = "ddp"  # under torchrun (training.py)
    timeout_minutes: int = 120  # of every collective


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
    dtype: torch.dtype = torch.float32,
) -> Path:
    """SFT of the base model (weights in `dtype`) on the sequences; resumable from out/checkpoints; the model (or
    adapter) ends in out/model. Each optimiser step takes batch_sequences sequences (packed into micro-batch rows),
    and its loss is the mean over all of that step's response tokens: each row's sum is divided by the step's token
    count. Every process of a torchrun job calls it; the process group stays open for the caller to close
    (run_self_align does)."""
    procs = Processes(config.timeout_minutes)
    final = out / "model"
    if final.exists():
        return final
    steps_per_epoch = math.ceil(len(sequences) / config.batch_sequences)
    total = steps_per_epoch * config.epochs
    torch.manual_seed(seed)
    model = load_model(
        base_path,
        device=procs.device,
        lora=config.lora,
        trainable=True,
        dtype=dtype,
        gradient_checkpointing=config.gradient_checkpointing,
    ).train()
    scorer = distribute(ModelCall(model, packed_logprobs), model, procs, config.distributed)
    trainable = Trainable(model, master_weights=config.master_weights)
    optimizer = build_optimizer(trainable.parameters(), config.optimizer)
    scheduler = build_scheduler(optimizer, config.optimizer, total)
    checkpoint = load_latest(out / "checkpoints")
    done = restore_training_state(checkpoint, trainable, optimizer, scheduler)["step"] if checkpoint else 0
    log = MetricsLog(out / "metrics.jsonl", resume_step=checkpoint[0] if checkpoint else None, enabled=procs.is_main)
    autocast = lambda: torch.autocast(procs.device.type, dtype=torch.bfloat16, enabled=config.precision == "bf16")  # noqa: E731
    for step in tqdm(range(done, total), desc=desc, unit="step", disable=not show, initial=done, total=total):
        epoch, index = divmod(step, steps_per_epoch)
        if step == done or index == 0:
            order = epoch_order(len(sequences), seed, epoch)
        start = index * config.batch_sequences
        chunk = [sequences[k] for k in order[start : start + config.batch_sequences]]
        count = sum(len(s.ids) - s.first_target for s in chunk)
        began, loss_sum = time.perf_counter(), 0.0
        rows = process_rows(chunk, config.pack_tokens, procs)
        for r, (row, weight) in enumerate(rows):
            with accumulating(scorer, last=r == len(rows) - 1):
                with autocast():
                    logp_sum = scorer(row).sum()
                (-logp_sum * weight * procs.world / count).backward()
            loss_sum -= logp_sum.item() * weight
        norm, lr = apply_update(trainable, optimizer, scheduler, config.optimizer.max_grad_norm)
        elapsed = time.perf_counter() - began
        log.log(
            {
                "kind": "train",
                "step": step + 1,
                "loss": procs.sum(loss_sum) / count,
                "lr": lr,
                "grad_norm": norm,
                "tokens_per_s": sum(len(s.ids) for s in chunk) / elapsed,
            }
        )
        if (step + 1) % config.checkpoint_every == 0 and step + 1 < total:
            save_training_checkpoint(
                out / "checkpoints",
                step + 1,
                trainable,
                optimizer,
                scheduler,
                procs,
                keep_last=1,
                hashing=config.checkpoint_hash,
                counters={"step": step + 1},
            )
    log.close()
    return save_pretrained_atomic(model, tokenizer, final, procs)


def process_rows(chunk: list[Sequence], pack_tokens: int, procs: Processes) -> list[tuple[list[Sequence], int]]:
    """(packed row, weight) of this process's share of a step's sequences (every world-th, from its rank), padded
    with (a row of one sequence, weight 0) to the busiest process's row count (module docstring)."""
    shares = [pack(chunk[r :: procs.world], pack_tokens) for r in range(procs.world)]
    rounds = max(map(len, shares))
    return [(row, 1) for row in shares[procs.rank]] + [([chunk[0]], 0)] * (rounds - len(shares[procs.rank]))


def epoch_order(count: int, seed: int, epoch: int) -> list[int]:
    """The order in which epoch `epoch` visits `count` sequences: a permutation that depends on (seed, epoch) only."""
    order = list(range(count))
    random.Random(f"{seed}/epoch {epoch}").shuffle(order)
    return order
