"""Supervised fine-tuning on (prompt, response) pairs with the fused log-prob kernels and sequence packing.

    loss = - sum over response tokens of log p(token | everything before it in its own sequence)
           / number of response tokens                       (the prompt is masked, no EOS target)

Sequences are tokenised as [BOS] + prompt + response (cut at `cutoff` tokens) and packed back to back into rows of
at most `pack_tokens` tokens with no padding inside a row; position ids restart at each sequence, which makes
transformers build a block-diagonal causal mask (and flash-attn run varlen), so no token sees another sequence.
Only the hidden states that predict response tokens reach the output head, through the fused kernels.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from tqdm.auto import tqdm

from .checkpoint import load_latest, save_checkpoint
from .metrics import MetricsLog
from .pairs import decoder_and_head, head_sequence_logprobs
from .training import (
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


@dataclass
class Sequence:
    ids: list[int]  # BOS + prompt + response
    first_target: int  # index of the first response token in ids


def tokenize_pair(tokenizer, prompt: str, response: str, cutoff: int) -> Sequence | None:
    """[BOS] + prompt + response, cut at `cutoff` tokens; None when no response token survives the cut."""
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    prompt_ids = bos + tokenizer(prompt, add_special_tokens=False).input_ids
    ids = (prompt_ids + tokenizer(response, add_special_tokens=False).input_ids)[:cutoff]
    return Sequence(ids, len(prompt_ids)) if len(ids) > len(prompt_ids) else None


def pack(sequences: list[Sequence], pack_tokens: int) -> list[list[Sequence]]:
    """Consecutive sequences grouped into rows of at most pack_tokens tokens (order kept, so resumes are exact)."""
    rows, row, used = [], [], 0
    for seq in sequences:
        if len(seq.ids) > pack_tokens:
            raise ValueError(f"a sequence of {len(seq.ids)} tokens exceeds pack_tokens = {pack_tokens}")
        if used + len(seq.ids) > pack_tokens:
            rows.append(row)
            row, used = [], 0
        row.append(seq)
        used += len(seq.ids)
    return rows + ([row] if row else [])


def packed_logprobs(model, row: list[Sequence], *, backend: str = "auto") -> torch.Tensor:
    """[len(row)] float32: sum of log p(response tokens | their own sequence's earlier tokens), per sequence of a
    packed row, from one decoder pass over the row."""
    decoder, head, temperature = decoder_and_head(model)
    device = next(model.parameters()).device
    ids = torch.tensor([t for s in row for t in s.ids], device=device)[None]
    positions = torch.cat([torch.arange(len(s.ids), device=device) for s in row])[None]
    hidden = decoder(input_ids=ids, position_ids=positions, use_cache=False).last_hidden_state[0]
    predicting, owner, offset = [], [], 0  # the state at p predicts token p + 1 of the same sequence
    for k, s in enumerate(row):
        predicting.extend(range(offset + s.first_target - 1, offset + len(s.ids) - 1))
        owner.extend([k] * (len(s.ids) - s.first_target))
        offset += len(s.ids)
    where = torch.tensor(predicting, device=device)
    return head_sequence_logprobs(
        head,
        temperature,
        hidden[where],
        ids[0, where + 1],
        torch.tensor(owner, device=device),
        len(row),
        reduction="sum",
        backend=backend,
    )


def sft_train(
    out: Path, base_path: str, sequences: list[Sequence], config: SFTConfig, tokenizer, *, show: bool, desc: str
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
    torch.manual_seed(0)
    model = load_model(base_path, device=procs.device, lora=config.lora, trainable=True).train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer(params, config.optimizer)
    scheduler = build_scheduler(optimizer, config.optimizer, total)
    checkpoint = load_latest(out / "checkpoints")
    done = restore_training_state(checkpoint, model, optimizer, scheduler)["step"] if checkpoint else 0
    log = MetricsLog(out / "metrics.jsonl", resume_step=checkpoint[0] if checkpoint else None)
    autocast = lambda: torch.autocast(procs.device.type, dtype=torch.bfloat16, enabled=config.precision == "bf16")  # noqa: E731
    for step in tqdm(range(done, total), desc=desc, unit="step", disable=not show, initial=done, total=total):
        start = (step % steps_per_epoch) * config.batch_sequences
        chunk = sequences[start : start + config.batch_sequences]
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
