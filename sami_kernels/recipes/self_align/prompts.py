"""Stage 1: prompts. Vanilla self-instruct from seed tasks, and topic-guided red-teaming (TGRT): topics brainstormed
per adversarial question type, then one question per (type, topic); the paper's filters."""

from __future__ import annotations

import random

import yaml
from tqdm.auto import tqdm

from ..data import read_jsonl
from ..stage_file import StageFile
from .config import DATA
from .session import Session
from .text import NearDuplicates, instruction_reject_reason, parse_numbered, topic_reject_reason


def write_prompts(session: Session) -> dict:
    c = session.config.prompts
    stage = StageFile(session.out, "1")
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
    model = session.model()
    header = (
        "You are asked to come up with a set of diverse task instructions for an AI assistant. Each instruction "
        "is one or two sentences a user might write, answerable in text alone.\n\nList of tasks:\n"
    )
    with tqdm(desc="stage 1: self-instruct", unit="req", total=c.max_requests, disable=not session.show) as bar:
        generator = session.generator(model, c.generation)
        for request in range(c.max_requests):
            kept = sum(r["source"] == "self-instruct" for r in stage.records)
            unit = f"request-{request}"
            if kept >= c.self_instruct:
                break
            bar.update()
            if unit in stage.done:
                continue
            sampled = random.Random(f"{session.config.seed}/{unit}").sample(seeds, c.seeds_per_prompt)
            listing = "".join(f"{k}. {s}\n" for k, s in enumerate(sampled, 1)) + f"{len(sampled) + 1}."
            seed = session.unit_seed("stage1", unit)
            output, finished = generator.generate_with_status(header, [listing], seeds=[seed])[0]
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
    tgrt(session, model, types, stage, unique)
    return stage.publish()


def tgrt(session: Session, model, types: list[dict], stage: StageFile, unique: NearDuplicates) -> None:
    """Topics per adversarial type (filtered, deduplicated across types, at most topics_per_type each), then
    one question per (type, topic) written from the type's seed questions as hints."""
    c = session.config.prompts
    topic_prefix = "Brainstorm topics for tricky questions a user could ask an AI assistant.\n\n"
    question_prefix = "Write one tricky question a user could ask an AI assistant, for the given type and topic.\n\n"
    generator = session.generator(model, c.generation)
    seen_topics = {t.lower() for qt in types for t in qt["topics"]} | {
        r["topic"].lower()
        for r in stage.records
        if "topic" in r  # from types done before a restart
    }
    for qt in tqdm(types, desc="stage 1: red-teaming", unit="type", disable=not session.show):
        unit = f"tgrt-{qt['name']}"
        if unit in stage.done:
            continue
        listing = (
            f"Question type: {qt['name']}. {qt['description']}\nTopics:\n"
            + "".join(f"{k}. {t}\n" for k, t in enumerate(qt["topics"], 1))
            + f"{len(qt['topics']) + 1}."
        )
        topics = []
        brainstormed = generator.generate(topic_prefix, [listing], seeds=[session.unit_seed("stage1", unit, "topics")])
        for topic in parse_numbered(brainstormed[0]):
            reason = topic_reject_reason(topic) or ("duplicate topic" if topic.lower() in seen_topics else None)
            reason = reason or ("type balance" if len(topics) >= c.topics_per_type else None)
            if reason is not None:
                stage.log({"count": {f"topics dropped: {reason}": 1}})
                continue
            seen_topics.add(topic.lower())
            topics.append(topic)
        hints = "".join(f"Topic: {t}\nQuestion: {q}\n" for t, q in zip(qt["topics"], qt["questions"], strict=False))
        prompts = [f"Question type: {qt['name']}. {qt['description']}\n{hints}Topic: {t}\nQuestion:" for t in topics]
        questions = generator.generate(
            question_prefix, prompts, seeds=[session.unit_seed("stage1", unit, topic) for topic in topics]
        )
        for k, (topic, text) in enumerate(zip(topics, questions, strict=True)):
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
