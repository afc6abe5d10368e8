"""SAMI's training step: K_t optimiser steps over the iteration's records,

    L = mean_b InfoNCE(M_b),   M_b[i, j] = mean log p(y_j | training_prompt(shuffle(c_i), x_b))

each step over B queries (this process's B / world of them, in micro-batches), checkpointed and resumable. Under
torchrun the pair engine is trained as training.distributed says (training.py: ddp or fsdp)."""

from __future__ import annotations

import functools
import math
import random
import time

import torch
from tqdm.auto import tqdm

from ...engine.pairs import PairScorer
from ...kernels.ops.infonce import infonce_loss
from ..training import (
    Trainable,
    accumulating,
    apply_update,
    build_optimizer,
    build_scheduler,
    distribute,
    restore_training_state,
    save_pretrained_atomic,
    save_training_checkpoint,
)
from .evaluation import log_heldout_mi, record_batch
from .session import Session


def train_iteration(session: Session, t: int, records, heldout, previous, first_step: int, resume) -> None:
    """model_t from the base model (restart, the paper) or model_{t-1} (continue), saved to iter-<t>/model."""
    c, procs, tc = session.config, session.procs, session.config.training
    torch.manual_seed(c.seed + t)  # a fresh LoRA's initialisation
    if tc.restart_from_base or previous is None:
        model = session.load(None, trainable=True, fresh_lora=True)
    else:
        model = session.load(previous, trainable=True)
    model.train()
    scorer = distribute(PairScorer(model, attn=tc.attn), model, procs, tc.distributed)
    trainable = Trainable(model, master_weights=tc.master_weights)
    optimizer = build_optimizer(trainable.parameters(), tc.optimizer)
    scheduler = build_scheduler(optimizer, tc.optimizer, tc.steps[t])
    done = restore_training_state(resume, trainable, optimizer, scheduler)["step"] if resume else 0
    steps = range(done, tc.steps[t])
    desc = f"iteration {t}: training"
    for k in tqdm(steps, desc=desc, unit="step", disable=not session.show, initial=done, total=tc.steps[t]):
        step = first_step + k + 1
        metrics = optimizer_step(session, scorer, trainable, optimizer, scheduler, records, t, k)
        session.log.log({"kind": "train", "iteration": t, "step": step, **metrics})
        if tc.eval_every and (k + 1) % tc.eval_every == 0:
            log_heldout_mi(session, scorer, step=step, iteration=t, records=heldout)
        if (k + 1) % tc.checkpoint_every == 0 or k + 1 == tc.steps[t]:
            save_training_checkpoint(
                session.out / "checkpoints",
                step,
                trainable,
                optimizer,
                scheduler,
                procs,
                keep_last=tc.keep_checkpoints,
                hashing=tc.checkpoint_hash,
                counters={"iteration": t, "step": k + 1},
            )
    save_pretrained_atomic(model, session.tokenizer, session.iteration_dir(t), procs)


def optimizer_step(session: Session, scorer, trainable: Trainable, optimizer, scheduler, records, t, k) -> dict:
    """One optimiser step over B queries: this process's B / world of them, in micro-batches whose losses are
    weighted by their share, so the summed gradient is that of the mean loss over B (DDP and FSDP average
    processes)."""
    c, procs, tc = session.config, session.procs, session.config.training
    local = tc.batch_queries // procs.world
    positions = [k * tc.batch_queries + procs.rank * local + q for q in range(local)]
    began = time.perf_counter()
    loss_sum, correct, tokens = 0.0, 0, 0
    micro = [positions[s : s + tc.micro_batch_queries] for s in range(0, local, tc.micro_batch_queries)]
    for m, chunk in enumerate(micro):
        batch = record_batch(
            session.tokenizer,
            [records[query_at(c.seed, t, p, len(records))] for p in chunk],
            session.principles,
            session.training_template,
            rng_for=lambda b, i, chunk=chunk: prompt_rng(c.seed, t, chunk[b], i),
        )
        with accumulating(scorer, last=m == len(micro) - 1):
            loss, M = micro_batch_backward(session, scorer, batch, weight=len(chunk) / local)
        loss_sum += loss.item() * len(chunk)
        n = batch.num_constitutions
        correct += int((M.detach().argmax(-1) == torch.arange(n, device=M.device)).sum())
        tokens += sum(map(len, (p for q in batch.prompt_ids for p in q)))
        tokens += sum(len(ids) for q in batch.pair_ids for row in q for ids in row)
    grad_norm, lr = apply_update(trainable, optimizer, scheduler, tc.optimizer.max_grad_norm)
    elapsed = time.perf_counter() - began
    n = c.constitutions.n
    loss = procs.mean(loss_sum / local)
    return {
        "loss": loss,
        "mi": math.log(n) - loss,
        "diagonal_accuracy": procs.mean(correct / (local * n)),
        "tokens_per_s": procs.mean(tokens / elapsed) * procs.world,
        "lr": lr,
        "grad_norm": grad_norm,
    }


def micro_batch_backward(session: Session, scorer, batch, *, weight: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, M) of one micro-batch, with the gradients of weight * loss accumulated: by one backward, or by gradient
    caching over chunks of training.max_pairs_per_pass pairs (engine/gradcache.py), whose chunk backwards run in the
    scorer's forward and whose last backward, here, is the one DDP synchronises."""
    tc = session.config.training
    if tc.max_pairs_per_pass is None:
        with session.autocast():
            M = scorer(batch)
        loss = infonce_loss(M.float(), direction=tc.direction)
        (loss * weight).backward()
        return loss, M
    step = {"max_pairs_per_pass": tc.max_pairs_per_pass, "direction": tc.direction, "loss_scale": weight}
    with session.autocast():
        remainder, loss, M = scorer(batch, step=step)
    remainder.backward()
    return loss, M


def prompt_rng(seed: int, t: int, position: int, constitution: int) -> random.Random:
    """The Random shuffling the clauses of one training prompt: constitution `constitution` of the record at
    `position` of iteration t's stream. Each prompt its own order, the same on a resumed run."""
    return random.Random(f"{seed}/{t}/prompt{position}/c{constitution}")


def query_at(seed: int, t: int, position: int, count: int) -> int:
    """The record at a position of iteration t's stream: a fresh seeded permutation per pass over the data."""
    return epoch_order(seed, t, position // count, count)[position % count]


@functools.lru_cache(maxsize=4)
def epoch_order(seed: int, t: int, epoch: int, count: int) -> list[int]:
    order = list(range(count))
    random.Random(f"{seed}/{t}/epoch{epoch}").shuffle(order)
    return order
