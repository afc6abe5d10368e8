"""SELF-ALIGN's text rules: parsing what the model wrote, and the filters of each stage. Pure functions of text.

Each filter returns the reason a text is dropped (a short string, counted per stage) or None to keep it.

Answers (stages 2 and 4) follow the reference's post-processing (IBM/Dromedary, written anew here):
  - an answer is complete when the model ended its turn; complete answers get the turn terminator appended;
  - an answer the token budget cut loses its last word, which may be partial (unless the text ended in whitespace);
  - every answer is cut at its first repeated clause, and an answer so cut is no longer complete;
  - stage 2 requires min_chars (160) of a COMPLETE answer and keeps a cut one of any length; stage 4 the other way
    round: it requires min_chars (128) of an answer the budget CUT and keeps a complete one of any length. Our
    lengths count the answer without the terminator (the reference counts its 11 characters in stage 2's 160);
  - an answer holding its instruction verbatim (an instruction of more than 16 characters) copies it and is dropped
    (the reference's stage-2 filter from its Dromedary-2 scripts on; we apply it in stage 4 too, where a copy
    teaches the same nothing);
  - refusal openings ("Sorry", "I'm sorry") are dropped in both stages (the reference checks them in stage 2 only).
"""

from __future__ import annotations

import re
import string

from rouge_score import rouge_scorer

DEFAULT_BLACKLIST = (
    "image",
    "images",
    "graph",
    "graphs",
    "picture",
    "pictures",
    "file",
    "files",
    "map",
    "maps",
    "draw",
    "plot",
    "go to",
    "video",
    "audio",
    "music",
    "flowchart",
    "diagram",
)


def parse_numbered(text: str) -> list[str]:
    """Items of a numbered list the model continued after a prompt ending in 'k.': the first line of the text
    is item k, then the first line after each 'n.' marker is one item."""
    items = re.split(r"\n\s*\d+\s*[.)]\s*", "\n" + text.strip())
    return [" ".join(item.strip().split("\n", 1)[0].split()) for item in items if item.strip()]


def instruction_reject_reason(text: str, blacklist=DEFAULT_BLACKLIST) -> str | None:
    """Self-instruct's filters: 3 < words <= 150, no blacklisted keyword, no punctuation or non-ASCII start."""
    words = text.split()
    if not 3 < len(words) <= 150:
        return "length"
    lowered = f" {text.lower()} "
    if any(re.search(rf"\b{re.escape(word)}\b", lowered) for word in blacklist):
        return "blacklisted keyword"
    if text[0] in string.punctuation or not text[0].isascii():
        return "punctuation or non-ASCII start"
    return None


def topic_reject_reason(topic: str) -> str | None:
    """Brainstormed topics: <= 3 words, every word capitalised, no trailing punctuation."""
    words = topic.split()
    if not 1 <= len(words) <= 3:
        return "topic length"
    if not all(w[0].isupper() for w in words if w[0].isalpha()) or not words[0][0].isalpha():
        return "topic not capitalised"
    if topic[-1] in string.punctuation:
        return "topic punctuation"
    return None


class NearDuplicates:
    """Exact (lowercased) and ROUGE-L F1 > threshold near-duplicate detection against every kept text."""

    def __init__(self, kept=(), threshold: float = 0.7):
        self.scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
        self.threshold, self.kept, self.lowered = threshold, [], set()
        for text in kept:
            self.add(text)

    def reason(self, text: str) -> str | None:
        if text.lower() in self.lowered:
            return "exact duplicate"
        if any(self.scorer.score(k, text)["rougeL"].fmeasure > self.threshold for k in self.kept):
            return "ROUGE-L near duplicate"
        return None

    def add(self, text: str) -> None:
        self.kept.append(text)
        self.lowered.add(text.lower())


def cut_repeated_clause(text: str) -> str:
    """The text up to the first clause (split at . ! ? ; , and newlines) that repeats an earlier one."""
    seen = set()
    for match in re.finditer(r"[^.!?;,\n]+[.!?;,\n]*", text):
        clause = " ".join(match.group().lower().strip(" .!?;,\n").split())
        if clause and clause in seen:
            return text[: match.start()].rstrip()
        seen.add(clause)
    return text


def word_ngrams(text: str, n: int) -> set[tuple[str, ...]]:
    words = re.findall(r"\w+", text.lower())
    return {tuple(words[k : k + n]) for k in range(len(words) - n + 1)}


def principled_response(
    output: str,
    *,
    complete: bool,
    instruction: str,
    identity: str,
    answer_marker: str,
    terminator: str,
    min_chars: int,
    leak_ngrams: set,
    leak_n: int,
    rename: tuple[str, str],
) -> tuple[str | None, str | None]:
    """Stage 2's post-filter on '<thoughts>{answer_marker}<answer>', already cut at the next user turn
    (complete: the model ended its turn): (response, None) or (None, reason). Keeps outputs whose thoughts start
    with the identity sentence and that contain an answer; drops the thoughts; finishes the answer (finish_answer);
    applies answer_reject_reason; renames the assistant; a complete answer gets the turn terminator."""
    if not output.lstrip().startswith(identity):
        return None, "no identity sentence"
    if answer_marker not in output:
        return None, "no answer"
    answer, complete = finish_answer(output.split(answer_marker, 1)[1], complete)
    reason = answer_reject_reason(
        answer,
        identity=identity,
        min_chars=min_chars,
        leak_ngrams=leak_ngrams,
        leak_n=leak_n,
        complete=complete,
        instruction=instruction,
    )
    if reason is not None:
        return None, reason
    answer = answer.replace(*rename)
    return (answer + terminator if complete else answer), None


def answer_reject_reason(
    answer: str,
    *,
    identity: str,
    min_chars: int,
    leak_ngrams: set,
    leak_n: int,
    complete: bool = True,
    instruction: str = "",
) -> str | None:
    """Stage 2's checks of the answer alone (thoughts dropped, answer finished): why it is dropped, or None.
    min_chars binds complete answers only; instruction: the query, to catch an answer that copies it."""
    if not answer:
        return "empty"
    if complete and len(answer) < min_chars:
        return "too short"
    if copies_instruction(answer, instruction):
        return "copies the instruction"
    if identity in answer or re.search(r"\bfollow rules? \d+ \(", answer):
        return "thoughts in the answer"
    if word_ngrams(answer, leak_n) & leak_ngrams:
        return "exemplar leak"
    if is_refusal_opening(answer):
        return "refusal opening"
    return None


def verbose_reject_reason(answer: str, *, complete: bool, min_chars: int, instruction: str) -> str | None:
    """Stage 4's checks of a finished answer: why it is dropped, or None. min_chars binds answers the budget cut."""
    if not answer:
        return "empty"
    if not complete and len(answer) < min_chars:
        return "too short"
    if copies_instruction(answer, instruction):
        return "copies the instruction"
    if is_refusal_opening(answer):
        return "refusal opening"
    return None


def finish_answer(text: str, complete: bool) -> tuple[str, bool]:
    """(answer, still complete): an answer the budget cut loses its trailing, possibly partial, word; then it is cut
    at its first repeated clause, and an answer so cut is no longer complete."""
    whole = text if complete else re.sub(r"\S+\Z", "", text)
    answer = cut_repeated_clause(whole.strip())
    return answer, complete and answer == whole.strip()


def copies_instruction(answer: str, instruction: str) -> bool:
    instruction = instruction.strip()
    return len(instruction) > 16 and instruction in answer


def is_refusal_opening(answer: str) -> bool:
    return re.match(r"(i'?m|i am)?\s*sorry", answer.lower()) is not None
