"""SAMI training loop (Fränken et al. 2024, Algorithm 1), on the fused pair engine.

    model_{-1} = base
    for iteration t in 0 .. T-1:
        sample:   per query x of iteration t's slice, N constitutions c_0..c_{N-1} (c_0 = the principles, the rest
                  antitheses); y_j = greedy(model_{t-1}, generation_prompt(c_j, x)), cut at stop strings; drop
                  filtered queries
        train:    model_t = base (restart, the paper) or model_{t-1} (continue); K_t optimiser steps, each over B
                  queries:  L = mean_b InfoNCE(M_b),  M_b[i, j] = mean log p(y_j | training_prompt(shuffle(c_i), x_b))
        evaluate: held-out MI lower bound log N - L, on fixed held-out queries with base-model responses
    finally: model_{T-1} vs base on held-out queries: the pairwise judge's win rate, ties and position flips, and
             the principles' judge-free adherence measures (evaluation.py)

Slices: iteration t samples only the queries it trains on, K_t * B of them: the training queries in their seeded
order, from position (K_0 + .. + K_{t-1}) * B on, wrapping around when the data run out (at most every query once per
iteration; with fewer kept records than K_t * B, training cycles over them). The reference sets such windows by
hand: its generate.py samples dataset[start_example:max_example] with the given model, one window per iteration (its
result files read "iteration-2-epoch-0.25-from-epoch-0.12"), not the whole training set. Sampling, the held-out
responses and the final greedy responses run on every process, split by batches and logged batch by batch
(sample.py), so a killed sampling phase resumes where it stopped.

Outputs under output_dir: config.yaml, heldout.jsonl, iter-<t>/generations.jsonl, iter-<t>/model/ (weights or
LoRA adapter + tokenizer), checkpoints/, metrics.jsonl, sami.png, judge.jsonl, adherence.jsonl, summary.json; the
sampling logs stage-heldout.log.jsonl, stage-iter-<t>.log.jsonl, stage-eval-<model>.log.jsonl.
Every file is written atomically; a killed run re-run with the same command resumes from its last checkpoint.
"""

from __future__ import annotations

import json
import random

from ..checkpoint import load_latest
from ..data import load_queries, write_text
from ..metrics import plot_training
from .config import SAMIConfig
from .evaluation import evaluate_against_base, log_heldout_mi
from .sample import sample
from .session import Session
from .train import train_iteration


def run_sami(config: SAMIConfig, **options) -> dict:
    """Algorithm 1. options: make_generator (session.py)."""
    session = Session(config, **options)
    c, out = config, session.out
    train_queries, heldout_queries = split_queries(c)
    checkpoint = load_latest(out / "checkpoints")
    session.start(resume_step=checkpoint[0] if checkpoint else None)
    heldout = sampled(session, out / "heldout.jsonl", None, heldout_queries, "heldout", "held-out responses")
    if checkpoint is None:  # the base model's held-out MI: the "before" point
        log_heldout_mi(session, None, step=0, iteration=-1, records=heldout)
    for t in range(c.training.iterations):
        if session.iteration_dir(t).exists():
            continue
        previous = session.iteration_dir(t - 1) if t > 0 else None  # model_{t-1}; None: the base model
        queries = iteration_queries(train_queries, c.training.steps, c.training.batch_queries, t)
        path = out / f"iter-{t}" / "generations.jsonl"
        records = sampled(session, path, previous, queries, f"iter-{t}", f"iteration {t}: sampling")
        resume = checkpoint if checkpoint and checkpoint[2]["iteration"] == t else None
        train_iteration(session, t, records, heldout, previous, sum(c.training.steps[:t]), resume)
    session.procs.barrier()
    return finish(session, heldout)


def sampled(session: Session, path, model_dir, queries: list[str], name: str, desc: str) -> list[dict]:
    """The records at path, sampled first (by every process: sample.py) unless a previous run wrote them. Every
    process decides alike: the phase before ended in a barrier, and the main process writes path only after the
    sampling's last collective, which needs every process."""
    made = None if path.exists() else sample(session, model_dir, queries, name, desc)
    return session.once(path, lambda: made)


def iteration_queries(train: list[str], steps, batch_queries: int, t: int) -> list[str]:
    """The training queries iteration t samples and trains on: the next steps[t] * batch_queries of the (seeded)
    training order after the sum(steps[:t]) * batch_queries the iterations before took, wrapping around at the end;
    never more than all of them (fewer than steps[t] * B: training cycles over them)."""
    count = min(steps[t] * batch_queries, len(train))
    start = sum(steps[:t]) * batch_queries
    return [train[(start + k) % len(train)] for k in range(count)]


def split_queries(config: SAMIConfig) -> tuple[list[str], list[str]]:
    """(training queries, held-out queries): a seeded shuffle of the data source, the first heldout_queries held out."""
    d = config.data
    queries = load_queries(d)
    random.Random(f"{config.seed}/split").shuffle(queries)
    heldout, train = queries[: d.heldout_queries], queries[d.heldout_queries :]
    train = train[: d.train_queries] if d.train_queries is not None else train
    if not heldout or not train:
        raise ValueError(f"data.source {d.source!r} has {len(queries)} queries: too few for the held-out split")
    return train, heldout


def finish(session: Session, heldout) -> dict:
    """The summary (main process): losses, held-out MI before / after, the judge's counts, adherence, where things
    went."""
    c, out, summary = session.config, session.out, {}
    last = session.iteration_dir(c.training.iterations - 1)
    evaluated = {}
    if c.evaluation.judge_queries or c.evaluation.adherence_queries:  # every process: split across them
        evaluated = evaluate_against_base(session, heldout, last)
    if session.procs.is_main:
        records = session.log.records()
        train = [r for r in records if r["kind"] == "train"]
        held = [r for r in records if r["kind"] == "heldout"]
        summary = {
            "first_loss": train[0]["loss"] if train else None,
            "last_loss": train[-1]["loss"] if train else None,
            "heldout_mi_before": held[0]["mi"] if held else None,
            "heldout_mi_after": held[-1]["mi"] if held else None,
            "heldout_mi_by_iteration": {str(r["iteration"]): r["mi"] for r in held},
            "model": str(last),
            "checkpoints": str(out / "checkpoints"),
            "metrics": str(out / "metrics.jsonl"),
            "plot": str(plot_training(records, out / "sami.png", title=f"SAMI on {c.model}")),
        }
        summary.update(evaluated)
        write_text(out / "summary.json", json.dumps(summary, indent=1) + "\n")
    session.log.close()
    session.procs.barrier()
    session.procs.close()
    return summary


def print_summary(summary: dict) -> None:
    if not summary:  # processes other than the main one
        return
    print("\nSAMI run summary")
    for key, value in summary.items():
        if key != "adherence":
            print(f"  {key:24s} {f'{value:.4f}' if isinstance(value, float) else value}")
    for name, measured in summary.get("adherence", {}).items():
        print(f"  adherence of {name} ({measured['metric']}, {measured['direction']} when followed; gap > 0: follows)")
        for model in ("base", "trained"):
            m = measured[model]
            print(f"    {model:8s} follow {m['follow']:9.4f}   flip {m['flip']:9.4f}   gap {m['gap']:+9.4f}")
