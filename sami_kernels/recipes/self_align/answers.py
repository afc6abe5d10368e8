"""Stage 2: principle-driven answers. The 16 rules and 5 exemplars as a prefix (encoded once, its KV cache reused for
every query), internal thoughts, sampled answers (T 0.5, top-p 0.95, the answer's first token may not be "Sorry"),
the post-filters (text.py). `answer_all` also serves stage 4."""

from __future__ import annotations

import dataclasses
import functools
import random

import yaml
from tqdm.auto import tqdm

from ...engine.generation import shared_prefix_prompts
from ..stage_file import StageFile
from .config import ANSWER_MARKER, DATA, IDENTITY, TERMINATOR
from .session import Session
from .text import principled_response, word_ngrams


def rules_prefix(session: Session) -> str:
    """The 16 rules and 5 exemplars with internal thoughts: identical for every query."""
    name = session.config.answers.prompt_name
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


def exemplar_leak_ngrams(n: int) -> set[tuple[str, ...]]:
    """The word n-grams of the 5 exemplar answers: an answer sharing one copied an exemplar."""
    exemplars = yaml.safe_load((DATA / "exemplars.yaml").read_text())["exemplars"]
    return set().union(*(word_ngrams(e["answer"], n) for e in exemplars))


def write_answers(session: Session) -> dict:
    c = session.config.answers
    queries = session.needs("1")
    if c.max_queries is not None and c.max_queries < len(queries):
        queries = random.Random(f"{session.config.seed}/answers").sample(queries, c.max_queries)
    stage = StageFile(session.out, "2")
    leaks = exemplar_leak_ngrams(c.leak_ngram)
    template = rules_prefix(session) + "### User\n{query}\n\n### " + c.prompt_name + " (internal thoughts)\n"
    named = lambda text: text.replace("{prompt_name}", c.prompt_name)  # noqa: E731
    generation = dataclasses.replace(c.generation, bans_after=named(c.generation.bans_after))
    keep = functools.partial(
        principled_response,
        identity=IDENTITY,
        answer_marker=named(ANSWER_MARKER),
        terminator=TERMINATOR,
        min_chars=c.min_chars,
        leak_ngrams=leaks,
        leak_n=c.leak_ngram,
        rename=(c.prompt_name, session.config.name),
    )
    answer_all(session, stage, queries, template, generation, None, "stage 2: answers", keep)
    return stage.publish()


def answer_all(
    session: Session, stage: StageFile, queries, template: str, generation, adapter, desc: str, keep
) -> None:
    """Answer every query not done yet, batch by batch (the template's part before {query} is encoded once, its
    KV cache reused for every batch); keep(output, complete=finished, instruction=...) -> (response, None) or
    (None, reason); saved after every batch. Each query's answer is sampled with its own seed (its stage and id), so
    a resumed run writes exactly what an uninterrupted one writes, even after a kill that cut a batch."""
    todo = [q for q in queries if q["id"] not in stage.done]
    if not todo:
        return
    model = session.model(adapter)
    done = len(queries) - len(todo)
    with tqdm(desc=desc, unit="answer", total=len(queries), initial=done, disable=not session.show) as bar:
        generator = session.generator(model, generation, bar)
        for start in range(0, len(todo), generation.batch_size):
            chunk = todo[start : start + generation.batch_size]
            prefix, prompts = shared_prefix_prompts(template, [q["instruction"] for q in chunk])
            seeds = [session.unit_seed(f"stage{stage.stage}", q["id"]) for q in chunk]
            outputs = generator.generate_with_status(prefix, prompts, seeds=seeds)
            for query, (output, finished) in zip(chunk, outputs, strict=True):
                response, reason = keep(output, complete=finished, instruction=query["instruction"])
                record = {"id": query["id"], "instruction": query["instruction"], "response": response}
                stage.add(query["id"], None if response is None else record, reason)
            stage.save()
