"""SELF-ALIGN's configuration: one dataclass per YAML section (every key checked, recipes/config.py), and the
fixed texts of the method."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from ...engine.generation import GenerationConfig
from .sft import SFTConfig
from .text import DEFAULT_BLACKLIST

DATA = Path(__file__).parents[2] / "data" / "self_align"
IDENTITY = "I am a helpful, ethical, and reliable assistant."
TERMINATOR = "\n\n### User\n"  # ends every complete answer: the next user turn
ANSWER_MARKER = "### {prompt_name}\n"  # stage 2: the thoughts end, the answer begins
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
    min_chars: int = 160  # of a complete answer (text.py)
    leak_ngram: int = 8  # an answer sharing a word n-gram with an exemplar answer is a leak
    # the ban lands on the answer's first token: bans_after is the answer marker ({prompt_name} is filled in)
    generation: GenerationConfig = field(
        default_factory=lambda: _sampling(
            max_new_tokens=256, temperature=0.5, top_p=0.95, first_token_bans=("Sorry",), bans_after=ANSWER_MARKER
        )
    )


@dataclass
class VerboseSection:
    min_chars: int = 128  # of an answer the token budget cut (text.py)
    generation: GenerationConfig = field(
        default_factory=lambda: _sampling(
            max_new_tokens=512, temperature=0.3, top_p=0.7, ngram_penalties={3: 1.0, 4: 2.0}
        )
    )
    training: SFTConfig = field(default_factory=lambda: SFTConfig(cutoff=768))


@dataclass
class EvaluationSection:  # the metrics: evaluation.py
    truthful: str = str(DATA / "mc_truthful.jsonl")  # MC1 groups {question, candidates, correct}
    hhh: str = str(DATA / "mc_hhh.jsonl")  # {query, a, b, better}
    heldout: str = str(DATA / "heldout_prompts.jsonl")  # never trained on: {id, instruction, kind}
    heldout_count: int | None = None  # the first n held-out prompts (ours alternate ordinary / red-team); None: all
    generation: GenerationConfig = field(  # the held-out answers: greedy (do_sample must stay false)
        default_factory=lambda: GenerationConfig(max_new_tokens=128, stop_strings=(TERMINATOR.strip(),))
    )


@dataclass
class SelfAlignConfig:
    model: str = "smollm2"
    output_dir: str = "runs/self-align"
    seed: int = 0
    model_dtype: Literal["float32", "bfloat16"] = "float32"  # the dtype every model is loaded in
    name: str = "Dromedary"  # the trained assistant's name
    progress: bool = True
    prompts: PromptsSection = field(default_factory=PromptsSection)
    answers: AnswersSection = field(default_factory=AnswersSection)
    engraving: SFTConfig = field(default_factory=SFTConfig)
    verbose: VerboseSection = field(default_factory=VerboseSection)
    evaluation: EvaluationSection = field(default_factory=EvaluationSection)
