"""SAMI training loop (Fränken et al. 2024, Algorithm 1), on the fused pair engine.

    model_{-1} = base
    for iteration t in 0 .. T-1:
        sample:   per training query x, N constitutions c_0..c_{N-1} (c_0 = the principles, the rest antitheses);
                  y_j = greedy(model_{t-1}, generation_prompt(c_j, x)), cut at stop strings; drop filtered queries
        train:    model_t = base (restart, the paper) or model_{t-1} (continue); K_t optimiser steps, each over B
                  queries:  L = mean_b InfoNCE(M_b),  M_b[i, j] = mean log p(y_j | training_prompt(shuffle(c_i), x_b))
        evaluate: held-out MI lower bound log N - L, on fixed held-out queries with base-model responses
    finally: pairwise judge win rate of model_{T-1} vs base on held-out queries

Outputs under output_dir: config.yaml, heldout.jsonl, iter-<t>/generations.jsonl, iter-<t>/model/ (weights or
LoRA adapter + tokenizer), checkpoints/, metrics.jsonl, sami.png, judge.jsonl, summary.json.
Every file is written atomically; a killed run re-run with the same command resumes from its last checkpoint.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
import yaml
from tqdm.auto import tqdm

from .checkpoint import load_latest, save_checkpoint
from .config import to_mapping
from .constitutions import PrincipleSet, load_principle_set, sample_constitutions
from .data import load_queries, read_jsonl, write_jsonl, write_text
from .generation import GenerationConfig, HFGenerator, shared_prefix_prompts
from .metrics import MetricsLog, plot_training
from .models import resolve_model_path
from .ops.infonce import infonce_loss
from .pairs import PairScorer
from .sami_eval import heldout_mi, judge_win, record_batch
from .training import (
    LoRAConfig,
    OptimizerConfig,
    Processes,
    apply_update,
    build_optimizer,
    build_scheduler,
    is_adapter_dir,
    load_model,
    restore_training_state,
    save_pretrained_atomic,
    trainable_state,
    training_state,
)

# Presets per task: (generation prompt with a format example and the prefill, training prompt without the example).
TEMPLATES = {
    "dialogue": (
        "System: Respond to the human as an assistant that follows these principles:\n{constitution}\n\n"
        "Human: How many legs does a spider have?\n\nAssistant: A spider has eight legs.\n\n"
        "Human: {query}\n\nAssistant:",
        "System: Respond to the human as an assistant that follows these principles:\n{constitution}\n\n"
        "Human: {query}\n\nAssistant:",
    ),
    "summarisation": (
        "System: Summarise the post, following these principles:\n{constitution}\n\n"
        "Post: I lent my bike to a friend for a week and he returned it with a bent wheel. He says it was already "
        "like that. Should I ask him to pay for the repair?\n\n"
        "Summary: The post asks whether to make a friend pay for a wheel he bent on a borrowed bike.\n\n"
        "Post: {query}\n\nSummary: The post",
        "System: Summarise the post, following these principles:\n{constitution}\n\nPost: {query}\n\nSummary: The post",
    ),
}


@dataclass
class ConstitutionsSection:
    set: str = "dialogue"  # built-in set name or a YAML/JSON file
    scheme: Literal["antithesis", "opposite"] = "antithesis"
    n: int = 2
    draw: int = 2  # principles drawn per query by the "opposite" scheme


@dataclass
class DataSection:
    source: str = "builtin:dialogue"
    field: str = "query"
    split: str = "train"
    data_files: str | None = None
    heldout_queries: int = 8
    train_queries: int | None = None  # None: every query not held out


@dataclass
class GenerationSection(GenerationConfig):  # max_new_tokens, batch_size, do_sample, temperature, top_p, stop_strings
    template: str | None = None  # None: the preset of the constitution set's task
    filters: bool = True


@dataclass
class TrainingSection:
    iterations: int = 3
    steps: tuple[int, ...] = (2, 4, 6)  # optimiser steps per iteration
    batch_queries: int = 128
    micro_batch_queries: int = 4
    restart_from_base: bool = True
    direction: Literal["both", "row", "col"] = "both"
    template: str | None = None
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    lora: LoRAConfig | None = None  # None: full fine-tune
    attn: Literal["auto", "cache", "tree"] = "auto"
    checkpoint_every: int = 1
    keep_checkpoints: int = 1
    eval_every: int = 1


@dataclass
class EvaluationSection:
    judge_queries: int = 0  # held-out queries judged trained-vs-base (0: no judge)
    judge: Literal["base", "trained"] = "base"


@dataclass
class SAMIConfig:
    model: str = "smollm2"  # "smollm2", "tiny-random", a local directory or a hub id
    output_dir: str = "runs/sami"
    seed: int = 0
    precision: Literal["fp32", "bf16"] = "fp32"  # bf16: autocast over fp32 weights
    progress: bool = True
    tensorboard: bool = False
    constitutions: ConstitutionsSection = field(default_factory=ConstitutionsSection)
    data: DataSection = field(default_factory=DataSection)
    generation: GenerationSection = field(default_factory=GenerationSection)
    training: TrainingSection = field(default_factory=TrainingSection)
    evaluation: EvaluationSection = field(default_factory=EvaluationSection)

    def validate(self) -> None:
        t = self.training
        if len(t.steps) != t.iterations:
            raise ValueError(f"training.steps has {len(t.steps)} entries for training.iterations = {t.iterations}")
        positive = {
            "training.iterations": t.iterations,
            "training.batch_queries": t.batch_queries,
            "training.micro_batch_queries": t.micro_batch_queries,
            "training.checkpoint_every": t.checkpoint_every,
            "training.keep_checkpoints": t.keep_checkpoints,
            "data.heldout_queries": self.data.heldout_queries,
            "constitutions.n": self.constitutions.n - 1,
        }
        for key, value in positive.items():
            if value < 1:
                raise ValueError(f"{key} must be >= {2 if key == 'constitutions.n' else 1}")
        for key, template in (("generation.template", self.generation.template), ("training.template", t.template)):
            if template is not None and not 0 <= template.find("{constitution}") < template.find("{query}"):
                raise ValueError(f"{key} must contain {{constitution}} and, after it, {{query}}")


def keep_reason(task: str, responses: list[str]) -> str | None:
    """Why a query's N responses are dropped (the paper's filters), or None to keep them."""
    if any(not r.strip() for r in responses):
        return "empty"
    if len(set(responses)) < len(responses):
        return "identical responses"
    if task == "summarisation":
        return None if all(r.rstrip().endswith(".") for r in responses) else "no final period"
    if any("[insert" in r.lower() or "[]" in r for r in responses):
        return "placeholder"
    if any("sorry" in r.lower() for r in responses):
        return "refusal"
    return None


class SAMIRun:
    """One run of the loop; `run()` is Algorithm 1 above. Every process of a torchrun job builds one."""

    def __init__(self, config: SAMIConfig, *, make_generator=HFGenerator):
        """make_generator(model, tokenizer, generation_config, progress=None) -> a Generator (generation.py)."""
        config.validate()
        self.config = c = config
        self.make_generator = make_generator
        self.procs = Processes()
        self.out = Path(c.output_dir)
        self.principles: PrincipleSet = load_principle_set(c.constitutions.set)
        task = self.principles.task if self.principles.task in TEMPLATES else "dialogue"
        self.task = task
        self.generation_template = c.generation.template or TEMPLATES[task][0]
        self.training_template = c.training.template or TEMPLATES[task][1]
        if c.training.batch_queries % self.procs.world:
            raise ValueError(
                f"training.batch_queries = {c.training.batch_queries} must divide evenly over {self.procs.world} "
                "processes"
            )
        if self.procs.is_main:
            self.base_path = resolve_model_path(c.model)  # may build or convert the model once
        self.procs.barrier()
        self.base_path = resolve_model_path(c.model)
        from transformers import AutoTokenizer
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # per-load bars would drown the loop's own
        self.tokenizer = AutoTokenizer.from_pretrained(self.base_path)
        self.bf16 = c.precision == "bf16"
        self.show = c.progress and self.procs.is_main

    def check_same_run(self) -> None:
        """Resuming reuses samples, checkpoints and metrics: refuse an output_dir written under another config."""
        saved = self.out / "config.yaml"
        if not saved.exists():
            return
        display_only = ("progress", "tensorboard")
        before = {k: v for k, v in yaml.safe_load(saved.read_text(encoding="utf-8")).items() if k not in display_only}
        now = {k: v for k, v in to_mapping(self.config).items() if k not in display_only}
        if before != now:
            changed = sorted(k for k in before.keys() | now.keys() if before.get(k) != now.get(k))
            raise ValueError(
                f"output_dir {self.out} holds a run made with a different config (sections {changed} differ); "
                "use another output_dir, or delete this one to start over"
            )

    # ---- data -------------------------------------------------------------------------------------------------
    def split_queries(self) -> tuple[list[str], list[str]]:
        d = self.config.data
        queries = load_queries(d.source, field=d.field, split=d.split, data_files=d.data_files)
        random.Random(f"{self.config.seed}/split").shuffle(queries)
        heldout, train = queries[: d.heldout_queries], queries[d.heldout_queries :]
        train = train[: d.train_queries] if d.train_queries is not None else train
        if not heldout or not train:
            raise ValueError(f"data.source {d.source!r} has {len(queries)} queries: too few for the held-out split")
        return train, heldout

    def sample(self, model, queries: list[str], seed: str, desc: str) -> tuple[list[dict], dict]:
        """Records {query, constitutions, responses} generated by `model`, the filtered ones dropped; counts."""
        c = self.config
        rng = random.Random(f"{c.seed}/{seed}")
        drawn = [
            sample_constitutions(
                self.principles, c.constitutions.n, rng, scheme=c.constitutions.scheme, draw=c.constitutions.draw
            )
            for _ in queries
        ]
        groups: dict[tuple, list[tuple[int, int]]] = {}  # constitution -> [(query, slot)]: one prefix per group
        for q, constitutions in enumerate(drawn):
            for j, constitution in enumerate(constitutions):
                groups.setdefault(constitution, []).append((q, j))
        responses = [[""] * c.constitutions.n for _ in queries]
        g = c.generation
        with tqdm(total=len(queries) * c.constitutions.n, desc=desc, unit="resp", disable=not self.show) as bar:
            generator = self.make_generator(model, self.tokenizer, g, progress=bar.update)
            for constitution, slots in groups.items():
                texts = generator.generate(
                    *shared_prefix_prompts(
                        self.generation_template,
                        [queries[q] for q, _ in slots],
                        constitution=self.principles.render(constitution),
                    )
                )
                for (q, j), text in zip(slots, texts, strict=True):
                    responses[q][j] = text.rstrip()
        records, counts = [], {"queries": len(queries), "kept": 0}
        for q, query in enumerate(queries):
            reason = keep_reason(self.task, responses[q]) if g.filters else None
            if reason is not None:
                counts[f"dropped: {reason}"] = counts.get(f"dropped: {reason}", 0) + 1
                continue
            counts["kept"] += 1
            records.append(
                {"query": query, "constitutions": [list(map(list, x)) for x in drawn[q]], "responses": responses[q]}
            )
        return records, counts

    def records_for(self, path: Path, make) -> list[dict]:
        """Records from path, made by the main process (make() -> (records, counts)) and written atomically once."""
        if self.procs.is_main and not path.exists():
            records, counts = make()
            if not records:
                raise ValueError(f"every query was filtered out while making {path} ({counts})")
            write_jsonl(path, records)
            write_text(path.with_suffix(".counts.json"), json.dumps(counts, indent=1) + "\n")
            if self.show:
                tqdm.write(f"{path}: {counts}")
        self.procs.barrier()
        return read_jsonl(path)

    # ---- models -----------------------------------------------------------------------------------------------
    def iteration_dir(self, t: int) -> Path:
        return self.out / f"iter-{t}" / "model"

    def load(self, trained_dir: Path | None, *, trainable: bool, fresh_lora: bool = False):
        """Base model, base + a saved adapter, or a saved full model; fresh_lora adds a new LoRA adapter."""
        device, lora = self.procs.device, self.config.training.lora
        if trained_dir is not None and is_adapter_dir(trained_dir):
            return load_model(self.base_path, device=device, lora=None, adapter=trained_dir, trainable=trainable)
        path = trained_dir if trained_dir is not None else self.base_path
        return load_model(path, device=device, lora=lora if fresh_lora else None, trainable=trainable)

    # ---- the loop ---------------------------------------------------------------------------------------------
    def run(self) -> dict:
        c, procs = self.config, self.procs
        self.check_same_run()
        procs.barrier()
        if procs.is_main:
            write_text(self.out / "config.yaml", yaml.safe_dump(to_mapping(c), sort_keys=False))
        train_queries, heldout_queries = self.split_queries()
        checkpoint = load_latest(self.out / "checkpoints")
        resume_step = checkpoint[0] if checkpoint else None
        self.log = MetricsLog(
            self.out / "metrics.jsonl",
            resume_step=resume_step,
            tensorboard_dir=self.out / "tensorboard" if c.tensorboard else None,
            enabled=procs.is_main,
        )
        heldout = self.records_for(
            self.out / "heldout.jsonl",
            lambda: self.sample(self.load(None, trainable=False), heldout_queries, "heldout", "held-out responses"),
        )
        if resume_step is None:  # the base model's held-out MI: the "before" point
            self.log_heldout(None, step=0, iteration=-1, records=heldout)
        start_of = [sum(c.training.steps[:t]) for t in range(c.training.iterations)]
        for t in range(c.training.iterations):
            if self.iteration_dir(t).exists():
                continue
            previous = self.iteration_dir(t - 1) if t > 0 else None
            records = self.records_for(
                self.out / f"iter-{t}" / "generations.jsonl",
                lambda t=t, previous=previous: self.sample(
                    self.load(previous, trainable=False), train_queries, f"iter-{t}", f"iteration {t}: sampling"
                ),
            )
            resume = checkpoint if checkpoint and checkpoint[2]["iteration"] == t else None
            self.train_iteration(t, records, heldout, previous, start_of[t], resume)
        procs.barrier()
        return self.finish(heldout)

    def train_iteration(self, t: int, records, heldout, previous, first_step: int, resume) -> None:
        c, procs, tc = self.config, self.procs, self.config.training
        torch.manual_seed(c.seed + t)  # a fresh LoRA's initialisation
        if tc.restart_from_base or previous is None:
            model = self.load(None, trainable=True, fresh_lora=True)
        else:
            model = self.load(previous, trainable=True)
        model.train()
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = build_optimizer(params, tc.optimizer)
        scheduler = build_scheduler(optimizer, tc.optimizer, tc.steps[t])
        done = restore_training_state(resume, model, optimizer, scheduler)["step"] if resume else 0
        scorer = PairScorer(model, attn=tc.attn)
        if procs.world > 1:
            scorer = torch.nn.parallel.DistributedDataParallel(scorer)
        steps = range(done, tc.steps[t])
        for k in tqdm(
            steps, desc=f"iteration {t}: training", unit="step", disable=not self.show, initial=done, total=tc.steps[t]
        ):
            step = first_step + k + 1
            metrics = self.optimizer_step(scorer, params, optimizer, scheduler, records, t, k)
            self.log.log({"kind": "train", "iteration": t, "step": step, **metrics})
            if tc.eval_every and (k + 1) % tc.eval_every == 0:
                self.log_heldout(model, step=step, iteration=t, records=heldout)
            if (k + 1) % tc.checkpoint_every == 0 or k + 1 == tc.steps[t]:
                state = training_state(optimizer, scheduler, iteration=t, step=k + 1)
                if procs.is_main:
                    save_checkpoint(
                        self.out / "checkpoints", step, trainable_state(model), state, keep_last=tc.keep_checkpoints
                    )
                procs.barrier()
        if procs.is_main:
            save_pretrained_atomic(model, self.tokenizer, self.iteration_dir(t))
        procs.barrier()

    def optimizer_step(self, scorer, params, optimizer, scheduler, records, t: int, k: int) -> dict:
        """One optimiser step over B queries: this process's B / world of them, in micro-batches whose losses are
        weighted by their share, so the summed gradient is that of the mean loss over B (DDP averages processes)."""
        c, procs, tc = self.config, self.procs, self.config.training
        local = tc.batch_queries // procs.world
        positions = [k * tc.batch_queries + procs.rank * local + q for q in range(local)]
        began = time.perf_counter()
        loss_sum, correct, tokens = 0.0, 0, 0
        micro = [positions[s : s + tc.micro_batch_queries] for s in range(0, local, tc.micro_batch_queries)]
        for m, chunk in enumerate(micro):
            batch = record_batch(
                self.tokenizer,
                [records[self.query_at(t, p, len(records))] for p in chunk],
                self.principles,
                self.training_template,
                rng_for=lambda b, chunk=chunk: random.Random(f"{c.seed}/{t}/prompt{chunk[b]}"),  # per prompt
            )
            sync = contextlib.nullcontext() if m == len(micro) - 1 or procs.world == 1 else scorer.no_sync()
            with sync:
                with self.autocast():
                    M = scorer(batch)
                loss = infonce_loss(M.float(), direction=tc.direction)
                (loss * (len(chunk) / local)).backward()
            loss_sum += loss.item() * len(chunk)
            n = batch.num_constitutions
            correct += int((M.detach().argmax(-1) == torch.arange(n, device=M.device)).sum())
            tokens += sum(map(len, (p for q in batch.prompt_ids for p in q)))
            tokens += sum(len(ids) for q in batch.pair_ids for row in q for ids in row)
        grad_norm, lr = apply_update(params, optimizer, scheduler, tc.optimizer.max_grad_norm)
        elapsed = time.perf_counter() - began
        n = self.config.constitutions.n
        loss = procs.mean(loss_sum / local)
        return {
            "loss": loss,
            "mi": math.log(n) - loss,
            "diagonal_accuracy": procs.mean(correct / (local * n)),
            "tokens_per_s": procs.mean(tokens / elapsed) * procs.world,
            "lr": lr,
            "grad_norm": grad_norm,
        }

    def query_at(self, t: int, position: int, count: int) -> int:
        """The record at a position of iteration t's stream: a fresh seeded permutation per pass over the data."""
        return self.epoch_order(t, position // count, count)[position % count]

    @functools.lru_cache(maxsize=4)  # noqa: B019 (one run object per process; a few small lists)
    def epoch_order(self, t: int, epoch: int, count: int) -> list[int]:
        order = list(range(count))
        random.Random(f"{self.config.seed}/{t}/epoch{epoch}").shuffle(order)
        return order

    def autocast(self):
        return torch.autocast(self.procs.device.type, dtype=torch.bfloat16, enabled=self.bf16)

    def log_heldout(self, model, *, step: int, iteration: int, records) -> None:
        """Held-out MI of `model` (None: the base model) logged by the main process."""
        if self.procs.is_main:
            model = model if model is not None else self.load(None, trainable=False)
            with self.autocast():
                mi = heldout_mi(
                    model,
                    self.tokenizer,
                    records,
                    self.principles,
                    self.training_template,
                    batch_queries=self.config.training.micro_batch_queries,
                )
            self.log.log({"kind": "heldout", "iteration": iteration, "step": step, "mi": mi})
        self.procs.barrier()

    # ---- evaluation and summary -------------------------------------------------------------------------------
    def finish(self, heldout) -> dict:
        c, procs = self.config, self.procs
        summary = {}
        if procs.is_main:
            records = self.log.records()
            train = [r for r in records if r["kind"] == "train"]
            held = [r for r in records if r["kind"] == "heldout"]
            last = self.iteration_dir(c.training.iterations - 1)
            summary = {
                "first_loss": train[0]["loss"] if train else None,
                "last_loss": train[-1]["loss"] if train else None,
                "heldout_mi_before": held[0]["mi"] if held else None,
                "heldout_mi_after": held[-1]["mi"] if held else None,
                "heldout_mi_by_iteration": {str(r["iteration"]): r["mi"] for r in held},
                "model": str(last),
                "checkpoints": str(self.out / "checkpoints"),
                "metrics": str(self.out / "metrics.jsonl"),
                "plot": str(plot_training(records, self.out / "sami.png", title=f"SAMI on {c.model}")),
            }
            if c.evaluation.judge_queries > 0:
                summary["judge_win_rate"] = self.judge(heldout[: c.evaluation.judge_queries], last)
                summary["judge"] = str(self.out / "judge.jsonl")
            write_text(self.out / "summary.json", json.dumps(summary, indent=1) + "\n")
        self.log.close()
        procs.barrier()
        procs.close()
        return summary

    def judge(self, heldout, trained_dir: Path) -> float:
        """Win rate of the trained model vs the base model, responses to held-out queries under the principles."""
        positive = self.principles.positive()
        constitution = self.principles.render(positive)
        queries = [r["query"] for r in heldout]
        g = self.config.generation
        models = {"base": self.load(None, trainable=False), "trained": self.load(trained_dir, trainable=False)}
        prompts = shared_prefix_prompts(self.generation_template, queries, constitution=constitution)
        responses = {}
        for name, model in models.items():
            generator = self.make_generator(model, self.tokenizer, dataclasses.replace(g, do_sample=False))
            responses[name] = [x.rstrip() for x in generator.generate(*prompts)]
        judge = models[self.config.evaluation.judge]
        rows = []
        for q, query in enumerate(tqdm(queries, desc="judging", disable=not self.show)):
            score = judge_win(judge, self.tokenizer, constitution, query, responses["trained"][q], responses["base"][q])
            rows.append(
                {"query": query, "trained": responses["trained"][q], "base": responses["base"][q], "score": score}
            )
        write_jsonl(self.out / "judge.jsonl", rows)
        return sum(r["score"] for r in rows) / len(rows)


def run_sami(config: SAMIConfig, **options) -> dict:
    return SAMIRun(config, **options).run()


def print_summary(summary: dict) -> None:
    if not summary:  # processes other than the main one
        return
    print("\nSAMI run summary")
    for key, value in summary.items():
        shown = f"{value:.4f}" if isinstance(value, float) else value
        print(f"  {key:24s} {shown}")
