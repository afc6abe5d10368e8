"""Stages 3 and 4: fine-tuning the BASE model without the rules. Stage 3 (principle engraving) on the stage-2 answers
with a short system prompt; stage 4 (verbose cloning) on the stage-3 model's answers to a teacher prompt asking for
extensive answers (3/4-gram frequency penalties), filtered, a FRESH LoRA on the base model."""

from __future__ import annotations

import functools

from ...engine.packed import tokenize_pair
from ...engine.tokens import BoundaryMergeError
from ..stage_file import StageFile
from .answers import answer_all
from .config import DATA, TERMINATOR
from .session import Session
from .sft import sft_train
from .text import finish_answer, verbose_reject_reason


def engraving_template(session: Session) -> str:
    """Stage 3's prompt with a {query} field: the short system prompt and one user turn, no rules (stages 3 and 4
    train on it, the engraving measure answers in it)."""
    return session.system + "### User\n{query}\n\n### " + session.config.name + "\n"


def sft_sequences(session: Session, records: list[dict], cutoff: int):
    """(query, response) -> [BOS] + engraving_template + response; loss on the response only. An answer
    cut away entirely by `cutoff`, or whose first token merges with the prompt's last (engine/tokens.py), is left out:
    the stage's "examples" count says how many were kept."""
    template, sequences = engraving_template(session), []
    for r in records:
        prompt = template.replace("{query}", r["instruction"])
        try:
            sequences.append(tokenize_pair(session.tokenizer, prompt, r["response"], cutoff))
        except BoundaryMergeError:
            continue
    return [s for s in sequences if s is not None]


def engrave(session: Session) -> dict:
    records = session.needs("2")
    if not records:
        raise ValueError("stage 2 kept no answers: nothing to engrave")
    config = session.config.engraving
    sequences = sft_sequences(session, records, config.cutoff)
    path = sft_train(
        session.out / "stage3",
        session.base_path,
        sequences,
        config,
        session.tokenizer,
        seed=session.unit_seed("stage3"),
        show=session.show,
        desc="stage 3: engraving",
        dtype=session.dtype,
    )
    return {"examples": len(sequences), "model": str(path)}


def verbose_clone(session: Session) -> dict:
    """Every process: the verbose answers (made by the main process), then the SFT on them."""
    c = session.config.verbose
    engraved = session.out / "stage3" / "model"
    if not engraved.exists():
        raise ValueError(f"stage 4 needs the stage-3 model at {engraved}: run stage 3 first")
    counts = session.main_only(functools.partial(verbose_answers, session, engraved))
    records = session.needs("4")
    if not records:
        raise ValueError("stage 4 kept no answers: nothing to clone")
    sequences = sft_sequences(session, records, c.training.cutoff)
    path = sft_train(
        session.out / "stage4",
        session.base_path,
        sequences,
        c.training,
        session.tokenizer,
        seed=session.unit_seed("stage4"),
        show=session.show,
        desc="stage 4: verbose cloning",
        dtype=session.dtype,
    )
    return {**(counts or {}), "examples": len(sequences), "model": str(path)}


def verbose_answers(session: Session, engraved) -> dict:
    """The stage-3 model's answers under the teacher prompt, filtered: stage4.jsonl; its counts."""
    stage = StageFile(session.out, "4")
    teacher = (DATA / "verbose_teacher.txt").read_text().strip()
    template = f"# System\n{teacher}\n\n" + "### User\n{query}\n\n" + f"### {session.config.name}\n"
    answer_all(
        session,
        stage,
        session.needs("2"),
        template,
        session.config.verbose.generation,
        engraved,
        "stage 4: verbose answers",
        functools.partial(verbose_response, session),
    )
    return stage.publish()


def verbose_response(
    session: Session, output: str, *, complete: bool, instruction: str
) -> tuple[str | None, str | None]:
    """Stage 4's filter (text.py): the answer finished, checked by verbose_reject_reason, a complete one terminated."""
    answer, complete = finish_answer(output, complete)
    reason = verbose_reject_reason(
        answer, complete=complete, min_chars=session.config.verbose.min_chars, instruction=instruction
    )
    if reason is not None:
        return None, reason
    return (answer + TERMINATOR if complete else answer), None
