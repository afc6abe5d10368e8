"""SELF-ALIGN (Sun et al. 2023, Dromedary): four stages from a base model and a few written principles.

    1  prompts:   vanilla self-instruct from seed tasks, and topic-guided red-teaming (TGRT): topics brainstormed
                  per adversarial question type, then one question per (type, topic); the paper's filters
    2  answers:   rules + exemplars prefix (encoded once, its KV cache reused for every query), internal thoughts,
                  sampled answers (T 0.5, top-p 0.95, first token may not be "Sorry"), the post-filters
    3  engrave:   SFT of the BASE model on (query, answer) with only a short system prompt (LoRA by default)
    4  verbose:   the stage-3 model answers under a teacher prompt asking for extensive answers (3/4-gram frequency
                  penalties); filtered; a FRESH LoRA on the base model is fine-tuned on them
    eval:         multiple-choice accuracy (true/false margin; A/B in both orders) of base, stage-3, stage-4 models

Each stage reads the previous stage's JSONL under output_dir and writes its own (stage1.jsonl, stage2.jsonl,
stage3/model, stage4.jsonl, stage4/model, eval.json), with counts per filter reason (stage<k>.counts.json).
Generation stages append every finished batch to stage<k>.log.jsonl (fsync'ed) and write their outputs atomically
from it when the stage ends; a re-run skips every unit of work already logged.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import random
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml
from tqdm.auto import tqdm

from .data import read_jsonl, write_jsonl, write_text
from .generation import GenerationConfig, HFGenerator, shared_prefix_prompts
from .mc_eval import hhh_accuracy, load_items, truthful_accuracy
from .models import resolve_model_path
from .self_align_text import (
    DEFAULT_BLACKLIST,
    NearDuplicates,
    finish_answer,
    instruction_reject_reason,
    is_refusal_opening,
    parse_numbered,
    principled_response,
    topic_reject_reason,
    word_ngrams,
)
from .sft import SFTConfig, sft_train, tokenize_pair
from .training import load_model

DATA = Path(__file__).parent / "data" / "self_align"
IDENTITY = "I am a helpful, ethical, and reliable assistant."
TERMINATOR = "\n\n### User\n"  # ends every complete answer: the next user turn
STAGES = ("1", "2", "3", "4", "eval")


def _sampling(**overrides) -> GenerationConfig:
    return GenerationConfig(**{"do_sample": True, "stop_strings": ("### User",), **overrides})


@dataclass
class PromptsSection:
    include_seeds: bool = True  # the seed tasks and seed red-team questions are prompts too (self-instruct's pool)
    self_instruct: int = 20  # instructions wanted from vanilla self-instruct
    seeds_per_prompt: int = 5
    max_requests: int = 40  # self-instruct requests before giving up on the wanted count
    types: int | None = None  # adversarial question types used (None: all 20)
    topics_per_type: int = 2  # balanced: at most this many new topics per type
    rouge_threshold: float = 0.7
    blacklist: tuple[str, ...] = DEFAULT_BLACKLIST
    generation: GenerationConfig = field(
        default_factory=lambda: _sampling(max_new_tokens=96, temperature=0.7, top_p=0.95, stop_strings=())
    )


@dataclass
class AnswersSection:
    max_queries: int | None = None  # answer at most this many stage-1 prompts (a seeded sample; None: all)
    prompt_name: str = "Nova"  # the assistant's name inside the rules prompt; renamed to `name` afterwards
    min_chars: int = 160
    leak_ngram: int = 8  # an answer sharing a word n-gram with an exemplar answer is a leak
    generation: GenerationConfig = field(
        default_factory=lambda: _sampling(max_new_tokens=256, temperature=0.5, top_p=0.95, first_token_bans=("Sorry",))
    )


@dataclass
class VerboseSection:
    min_chars: int = 160
    generation: GenerationConfig = field(
        default_factory=lambda: _sampling(
            max_new_tokens=512, temperature=0.3, top_p=0.7, ngram_penalties={3: 1.0, 4: 2.0}
        )
    )
    training: SFTConfig = field(default_factory=lambda: SFTConfig(cutoff=768))


@dataclass
class EvaluationSection:
    truthful: str = str(DATA / "mc_truthful.jsonl")
    hhh: str = str(DATA / "mc_hhh.jsonl")


@dataclass
class SelfAlignConfig:
    model: str = "smollm2"
    output_dir: str = "runs/self-align"
    seed: int = 0
    name: str = "Dromedary"  # the trained assistant's name
    progress: bool = True
    prompts: PromptsSection = field(default_factory=PromptsSection)
    answers: AnswersSection = field(default_factory=AnswersSection)
    engraving: SFTConfig = field(default_factory=SFTConfig)
    verbose: VerboseSection = field(default_factory=VerboseSection)
    evaluation: EvaluationSection = field(default_factory=EvaluationSection)


class StageFile:
    """A stage's progress as an append-only log (stage<k>.log.jsonl): one line per finished unit of work (its record
    if kept, the counts it adds). Each batch is appended in one write and fsync'ed, so saving costs what the batch
    adds, and a kill loses at most the batch being written (a torn last line is ignored). `publish` writes the
    stage's outputs, stage<k>.jsonl and stage<k>.counts.json, atomically from the log."""

    def __init__(self, out: Path, stage: str):
        self.path, self.counts_path = out / f"stage{stage}.jsonl", out / f"stage{stage}.counts.json"
        self.log_path = out / f"stage{stage}.log.jsonl"
        self.records: list[dict] = []
        self.counts: dict[str, int] = {}
        self.done: set[str] = set()
        self.pending: list[dict] = []
        lines = self.log_path.read_text(encoding="utf-8").splitlines() if self.log_path.exists() else []
        for k, line in enumerate(lines):
            try:
                event = json.loads(line)
            except json.JSONDecodeError:  # torn by a kill mid-append: that batch was never reported done
                write_text(self.log_path, "".join(x + "\n" for x in lines[:k]))  # so appends follow whole lines
                break
            self._apply(event)

    def _apply(self, event: dict) -> None:
        if "unit" in event:
            self.done.add(event["unit"])
        if "record" in event:
            self.records.append(event["record"])
        for key, n in event.get("count", {}).items():
            self.counts[key] = self.counts.get(key, 0) + n

    def log(self, event: dict) -> None:
        self._apply(event)
        self.pending.append(event)

    def add(self, unit: str, record: dict | None, reason: str | None = None) -> None:
        """A generated item: kept (its record) or dropped for `reason`."""
        key = "kept" if record is not None else f"dropped: {reason}"
        self.log(
            {"unit": unit, "count": {"generated": 1, key: 1}, **({"record": record} if record is not None else {})}
        )

    def save(self) -> None:
        if not self.pending:
            return
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "a", encoding="utf-8") as f:
            f.write("".join(json.dumps(e, ensure_ascii=False) + "\n" for e in self.pending))
            f.flush()
            os.fsync(f.fileno())
        self.pending = []

    def publish(self) -> dict:
        self.save()
        write_jsonl(self.path, self.records)
        write_text(self.counts_path, json.dumps({"counts": self.counts}, indent=1) + "\n")
        return self.counts


class SelfAlignRun:
    def __init__(self, config: SelfAlignConfig, *, make_generator=HFGenerator):
        """make_generator(model, tokenizer, generation_config, progress=None) -> an HFGenerator-like object with
        generate and generate_with_status (generation.py)."""
        self.config = c = config
        self.make_generator = make_generator
        self.out = Path(c.output_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        self.base_path = resolve_model_path(c.model)
        from transformers import AutoTokenizer
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        self.tokenizer = AutoTokenizer.from_pretrained(self.base_path)
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.show = c.progress
        self.system = (
            f"# System\nThis is a conversation between a user and {c.name}, an AI assistant that answers "
            "helpfully, honestly and harmlessly.\n\n"
        )

    def run(self, stage: str) -> dict:
        if stage not in ("all", *STAGES):
            raise ValueError(f"--stage must be one of all, {', '.join(STAGES)}; got {stage!r}")
        steps = {"1": self.stage1, "2": self.stage2, "3": self.stage3, "4": self.stage4, "eval": self.evaluate}
        report = {}
        for name in STAGES if stage == "all" else (stage,):
            report[name] = steps[name]()
            if self.show:
                tqdm.write(f"stage {name}: {report[name]}")
        return report

    def model(self, adapter: Path | None = None):
        return load_model(self.base_path, device=self.device, lora=None, adapter=adapter, trainable=False).eval()

    def generator(self, model, generation: GenerationConfig, bar=None):
        return self.make_generator(model, self.tokenizer, generation, progress=None if bar is None else bar.update)

    def seed_generation(self, unit: str) -> None:
        """Sampling is seeded per unit of work, so a resumed run draws what an uninterrupted one would."""
        digest = hashlib.sha256(f"{self.config.seed}/{unit}".encode()).digest()
        torch.manual_seed(int.from_bytes(digest[:8], "little") % 2**63)

    def needs(self, stage: str) -> list[dict]:
        path = self.out / f"stage{stage}.jsonl"
        if not path.exists():
            raise ValueError(f"stage {int(stage) + 1} reads {path}: run stage {stage} first")
        return read_jsonl(path)

    # ---- stage 1: prompts ---------------------------------------------------------------------------------------
    def stage1(self) -> dict:
        c = self.config.prompts
        stage = StageFile(self.out, "1")
        seeds = [r["instruction"] for r in read_jsonl(DATA / "seed_tasks.jsonl")]
        types = yaml.safe_load((DATA / "red_team_types.yaml").read_text())["types"][: c.types]
        if c.include_seeds and "seeds" not in stage.done:
            seed_records = [{"id": f"seed-{k}", "source": "seed", "instruction": t} for k, t in enumerate(seeds)] + [
                {"id": f"seed-{qt['name']}-{k}", "source": "tgrt-seed", "type": qt["name"], "instruction": text}
                for qt in types
                for k, text in enumerate(qt["questions"])
            ]
            for record in seed_records:
                stage.log({"record": record, "count": {"seeds": 1}})
            stage.log({"unit": "seeds"})
            stage.save()
        unique = NearDuplicates([*seeds, *(r["instruction"] for r in stage.records)], threshold=c.rouge_threshold)
        model = self.model()
        header = (
            "You are asked to come up with a set of diverse task instructions for an AI assistant. Each instruction "
            "is one or two sentences a user might write, answerable in text alone.\n\nList of tasks:\n"
        )
        with tqdm(desc="stage 1: self-instruct", unit="req", total=c.max_requests, disable=not self.show) as bar:
            generator = self.generator(model, c.generation)
            for request in range(c.max_requests):
                kept = sum(r["source"] == "self-instruct" for r in stage.records)
                unit = f"request-{request}"
                if kept >= c.self_instruct:
                    break
                bar.update()
                if unit in stage.done:
                    continue
                sampled = random.Random(f"{self.config.seed}/{unit}").sample(seeds, c.seeds_per_prompt)
                listing = "".join(f"{k}. {s}\n" for k, s in enumerate(sampled, 1)) + f"{len(sampled) + 1}."
                self.seed_generation(unit)
                output, finished = generator.generate_with_status(header, [listing])[0]
                items = parse_numbered(output)
                if items and not finished:  # the token budget ran out inside the last item
                    stage.add(f"{unit}-{len(items) - 1}", None, "cut by max_new_tokens")
                    items.pop()
                for k, text in enumerate(items):
                    reason = instruction_reject_reason(text, c.blacklist) or unique.reason(text)
                    record = None
                    if reason is None and kept < c.self_instruct:
                        unique.add(text)
                        kept += 1
                        record = {"id": f"si-{request}-{k}", "source": "self-instruct", "instruction": text}
                    stage.add(f"{unit}-{k}", record, reason or ("enough" if record is None else None))
                stage.log({"unit": unit})
                stage.save()
        self.tgrt(model, types, stage, unique)
        return stage.publish()

    def tgrt(self, model, types: list[dict], stage: StageFile, unique: NearDuplicates) -> None:
        """Topics per adversarial type (filtered, deduplicated across types, at most topics_per_type each), then
        one question per (type, topic) written from the type's seed questions as hints."""
        c = self.config.prompts
        topic_prefix = "Brainstorm topics for tricky questions a user could ask an AI assistant.\n\n"
        question_prefix = (
            "Write one tricky question a user could ask an AI assistant, for the given type and topic.\n\n"
        )
        generator = self.generator(model, c.generation)
        seen_topics = {t.lower() for qt in types for t in qt["topics"]} | {
            r["topic"].lower()
            for r in stage.records
            if "topic" in r  # from types done before a restart
        }
        for qt in tqdm(types, desc="stage 1: red-teaming", unit="type", disable=not self.show):
            unit = f"tgrt-{qt['name']}"
            if unit in stage.done:
                continue
            listing = (
                f"Question type: {qt['name']}. {qt['description']}\nTopics:\n"
                + "".join(f"{k}. {t}\n" for k, t in enumerate(qt["topics"], 1))
                + f"{len(qt['topics']) + 1}."
            )
            self.seed_generation(unit)
            topics = []
            for topic in parse_numbered(generator.generate(topic_prefix, [listing])[0]):
                reason = topic_reject_reason(topic) or ("duplicate topic" if topic.lower() in seen_topics else None)
                reason = reason or ("type balance" if len(topics) >= c.topics_per_type else None)
                if reason is not None:
                    stage.log({"count": {f"topics dropped: {reason}": 1}})
                    continue
                seen_topics.add(topic.lower())
                topics.append(topic)
            hints = "".join(f"Topic: {t}\nQuestion: {q}\n" for t, q in zip(qt["topics"], qt["questions"], strict=False))
            prompts = [
                f"Question type: {qt['name']}. {qt['description']}\n{hints}Topic: {t}\nQuestion:" for t in topics
            ]
            for k, (topic, text) in enumerate(zip(topics, generator.generate(question_prefix, prompts), strict=True)):
                question = " ".join(text.strip().split("\n", 1)[0].split())
                reason = instruction_reject_reason(question, c.blacklist) or unique.reason(question)
                record = None
                if reason is None:
                    unique.add(question)
                    record = {
                        "id": f"{unit}-{k}",
                        "source": "tgrt",
                        "type": qt["name"],
                        "topic": topic,
                        "instruction": question,
                    }
                stage.add(f"{unit}-{k}", record, reason)
            stage.log({"unit": unit})
            stage.save()

    # ---- stage 2: principle-driven answers ---------------------------------------------------------------------
    def rules_prefix(self) -> str:
        """The 16 rules and 5 exemplars with internal thoughts: identical for every query."""
        name = self.config.answers.prompt_name
        rules = yaml.safe_load((DATA / "rules.yaml").read_text())["rules"]
        exemplars = yaml.safe_load((DATA / "exemplars.yaml").read_text())["exemplars"]
        text = (
            f"# {name}\n\n## General rules\n{name} is an AI assistant that follows these rules:\n"
            + "".join(f"{k} ({r['name']}). {r['text']}\n" for k, r in enumerate(rules, 1))
            + f"\n## Examples\nBefore answering, {name} writes internal thoughts naming the rules that apply.\n\n"
        )
        for e in exemplars:
            text += (
                f"### User\n{e['query']}\n\n### {name} (internal thoughts)\n{e['thoughts']}\n\n"
                f"### {name}\n{e['answer']}\n\n"
            )
        return text

    def stage2(self) -> dict:
        c = self.config.answers
        queries = self.needs("1")
        if c.max_queries is not None and c.max_queries < len(queries):
            queries = random.Random(f"{self.config.seed}/answers").sample(queries, c.max_queries)
        stage = StageFile(self.out, "2")
        exemplars = yaml.safe_load((DATA / "exemplars.yaml").read_text())["exemplars"]
        leaks = set().union(*(word_ngrams(e["answer"], c.leak_ngram) for e in exemplars))
        template = self.rules_prefix() + "### User\n{query}\n\n### " + c.prompt_name + " (internal thoughts)\n"
        keep = functools.partial(
            principled_response,
            identity=IDENTITY,
            answer_marker=f"### {c.prompt_name}\n",
            terminator=TERMINATOR,
            min_chars=c.min_chars,
            leak_ngrams=leaks,
            leak_n=c.leak_ngram,
            rename=(c.prompt_name, self.config.name),
        )
        self.answer_all(stage, queries, template, c.generation, None, "stage 2: answers", keep)
        return stage.publish()

    def answer_all(self, stage: StageFile, queries, template: str, generation, adapter, desc: str, keep) -> None:
        """Answer every query not done yet, batch by batch (the template's part before {query} is encoded once, its
        KV cache reused for every batch); keep(output, complete=finished) -> (response, None) or (None, reason);
        saved after every batch."""
        todo = [q for q in queries if q["id"] not in stage.done]
        if not todo:
            return
        model = self.model(adapter)
        done = len(queries) - len(todo)
        with tqdm(desc=desc, unit="answer", total=len(queries), initial=done, disable=not self.show) as bar:
            generator = self.generator(model, generation, bar)
            for start in range(0, len(todo), generation.batch_size):
                chunk = todo[start : start + generation.batch_size]
                self.seed_generation(f"{desc}/{chunk[0]['id']}")
                prompts = shared_prefix_prompts(template, [q["instruction"] for q in chunk])
                for query, (output, finished) in zip(chunk, generator.generate_with_status(*prompts), strict=True):
                    response, reason = keep(output, complete=finished)
                    record = {"id": query["id"], "instruction": query["instruction"], "response": response}
                    stage.add(query["id"], None if response is None else record, reason)
                stage.save()

    # ---- stages 3 and 4: fine-tuning the base model -----------------------------------------------------------
    def sft_sequences(self, records: list[dict], cutoff: int):
        """(query, response) -> [BOS] + short system prompt + user turn + response; loss on the response only."""
        prompts = [f"{self.system}### User\n{r['instruction']}\n\n### {self.config.name}\n" for r in records]
        sequences = [
            tokenize_pair(self.tokenizer, p, r["response"], cutoff) for p, r in zip(prompts, records, strict=True)
        ]
        return [s for s in sequences if s is not None]

    def stage3(self) -> dict:
        records = self.needs("2")
        if not records:
            raise ValueError("stage 2 kept no answers: nothing to engrave")
        config = self.config.engraving
        sequences = self.sft_sequences(records, config.cutoff)
        path = sft_train(
            self.out / "stage3",
            self.base_path,
            sequences,
            config,
            self.tokenizer,
            show=self.show,
            desc="stage 3: engraving",
        )
        return {"examples": len(sequences), "model": str(path)}

    def stage4(self) -> dict:
        c = self.config.verbose
        queries = self.needs("2")
        engraved = self.out / "stage3" / "model"
        if not engraved.exists():
            raise ValueError(f"stage 4 needs the stage-3 model at {engraved}: run stage 3 first")
        stage = StageFile(self.out, "4")
        teacher = (DATA / "verbose_teacher.txt").read_text().strip()
        template = f"# System\n{teacher}\n\n" + "### User\n{query}\n\n" + f"### {self.config.name}\n"
        self.answer_all(
            stage, queries, template, c.generation, engraved, "stage 4: verbose answers", self.verbose_response
        )
        stage.publish()
        if not stage.records:
            raise ValueError("stage 4 kept no answers: nothing to clone")
        sequences = self.sft_sequences(stage.records, c.training.cutoff)
        path = sft_train(
            self.out / "stage4",
            self.base_path,
            sequences,
            c.training,
            self.tokenizer,
            show=self.show,
            desc="stage 4: verbose cloning",
        )
        return {**stage.counts, "model": str(path)}

    def verbose_response(self, output: str, complete: bool) -> tuple[str | None, str | None]:
        """Stage 4's filter: cut at the first repeated clause, at least min_chars, no refusal opening."""
        answer, complete = finish_answer(output, complete)
        if len(answer) < self.config.verbose.min_chars:
            return None, "too short"
        if is_refusal_opening(answer):
            return None, "refusal opening"
        return (answer + TERMINATOR if complete else answer), None

    # ---- evaluation -------------------------------------------------------------------------------------------
    def evaluate(self) -> dict:
        c = self.config.evaluation
        truthful, hhh = load_items(c.truthful, "truthful"), load_items(c.hhh, "hhh")
        results = {}
        for label, adapter in (
            ("base", None),
            ("stage3", self.out / "stage3" / "model"),
            ("stage4", self.out / "stage4" / "model"),
        ):
            if adapter is not None and not adapter.exists():
                continue
            model = self.model(adapter)
            results[label] = {
                "truthful_mc_accuracy": truthful_accuracy(
                    model, self.tokenizer, truthful, system=self.system, name=self.config.name
                ),
                "hhh_mc_accuracy": hhh_accuracy(model, self.tokenizer, hhh, system=self.system, name=self.config.name),
            }
        results["items"] = {"truthful": len(truthful), "hhh": len(hhh)}
        write_text(self.out / "eval.json", json.dumps(results, indent=1) + "\n")
        return results


def run_self_align(config: SelfAlignConfig, stage: str = "all", **options) -> dict:
    return SelfAlignRun(config, **options).run(stage)


def print_report(report: dict) -> None:
    print("\nSELF-ALIGN report")
    for stage, values in report.items():
        print(
            f"  stage {stage}: "
            + ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in values.items())
        )
