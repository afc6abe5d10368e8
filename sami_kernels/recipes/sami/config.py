"""The SAMI loop's configuration: one dataclass per YAML section (every key checked, recipes/config.py), and the
prompt presets per task.

Prompts (`prompt_format`): each task's preset is a system instruction, one format example (a query and its
response), how a query is shown and a prefill that starts the response. Templates are strings with the fields
{constitution} and {query}; the generation template holds the format example, the training template does not.
    raw:  the paper's plain text, "System: <instruction>\n{constitution}\n\nHuman: ...\n\nAssistant:<prefill>".
    chat: the tokenizer's own chat template (instruct models): a system message <instruction>\n{constitution},
          [the example as a prior user / assistant exchange,] the query as the user message, the generation prompt
          of the assistant's turn, then the prefill. Rendered once by apply_chat_template with sentinel values that
          become the fields (the chat text's own braces escaped), so template.format(...) equals apply_chat_template
          on the filled-in messages; generation and scoring use the same text.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from ...engine.generation import GenerationConfig
from ..data import QuerySource
from ..training import LoRAConfig, OptimizerConfig


@dataclass(frozen=True)
class PromptPreset:
    instruction: str  # the system text before the numbered constitution
    example_query: str
    example_response: str
    user: str  # label of a query (raw "<user>: <query>"); a chat user message is the query, labelled unless "Human"
    assistant: str  # raw label of the response ("Assistant", "Summary")
    prefill: str = ""  # the response's first words, written by the prompt

    def raw(self, *, example: bool) -> str:
        shot = f"{self.user}: {self.example_query}\n\n{self.assistant}: {self.example_response}\n\n" if example else ""
        return (
            f"System: {self.instruction}\n{{constitution}}\n\n{shot}{self.user}: {{query}}\n\n"
            f"{self.assistant}:{self.prefill and ' ' + self.prefill}"
        )

    def chat_messages(self, constitution: str, query: str, *, example: bool) -> list[dict]:
        shown = (lambda q: q) if self.user == "Human" else (lambda q: f"{self.user}: {q}")
        shot = [
            {"role": "user", "content": shown(self.example_query)},
            {"role": "assistant", "content": self.example_response},
        ]
        return [
            {"role": "system", "content": f"{self.instruction}\n{constitution}"},
            *(shot if example else []),
            {"role": "user", "content": shown(query)},
        ]

    def chat(self, tokenizer, *, example: bool) -> str:
        sentinels = {"constitution": "\x1eSAMI-CONSTITUTION\x1e", "query": "\x1eSAMI-QUERY\x1e"}
        text = tokenizer.apply_chat_template(
            self.chat_messages(sentinels["constitution"], sentinels["query"], example=example),
            tokenize=False,
            add_generation_prompt=True,
        )
        text = text.replace("{", "{{").replace("}", "}}")
        for name, sentinel in sentinels.items():
            if text.count(sentinel) != 1:
                raise ValueError(
                    f"prompt_format: chat: the tokenizer's chat template does not show the {name} verbatim once; "
                    "use prompt_format: raw"
                )
            text = text.replace(sentinel, f"{{{name}}}")
        return text + self.prefill


PRESETS = {
    "dialogue": PromptPreset(
        instruction="Respond to the human as an assistant that follows these principles:",
        example_query="How many legs does a spider have?",
        example_response="A spider has eight legs.",
        user="Human",
        assistant="Assistant",
    ),
    "summarisation": PromptPreset(
        instruction="Summarise the post, following these principles:",
        example_query="I lent my bike to a friend for a week and he returned it with a bent wheel. He says it was "
        "already like that. Should I ask him to pay for the repair?",
        example_response="The post asks whether to make a friend pay for a wheel he bent on a borrowed bike.",
        user="Post",
        assistant="Summary",
        prefill="The post",
    ),
}


def prompt_templates(prompt_format: str, task: str, tokenizer) -> tuple[str, str]:
    """(generation template with the format example, training template without it) of a task's preset."""
    preset = PRESETS[task]
    if prompt_format == "raw":
        return preset.raw(example=True), preset.raw(example=False)
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError(
            f"prompt_format: chat needs a tokenizer with a chat template, and {tokenizer.name_or_path!r} has none; "
            "use prompt_format: raw (the paper's plain System / Human / Assistant text)"
        )
    return preset.chat(tokenizer, example=True), preset.chat(tokenizer, example=False)


TEMPLATES = {task: prompt_templates("raw", task, None) for task in PRESETS}  # the raw (generation, training) pairs


@dataclass
class ConstitutionsSection:
    set: str = "dialogue"  # built-in set name or a YAML/JSON file
    scheme: Literal["antithesis", "opposite"] = "antithesis"
    n: int = 2
    draw: int = 2  # principles drawn per query by the "opposite" scheme


@dataclass
class DataSection(QuerySource):  # source, field, split, data_files, config, extractor, dedup_key (recipes/data.py)
    heldout_queries: int = 8
    train_queries: int | None = None  # None: every query not held out


@dataclass
class GenerationSection(GenerationConfig):  # max_new_tokens, batch_size, do_sample, temperature, top_p, stop_strings
    template: str | None = None  # None: the preset of the constitution set's task
    filters: bool = True
    engine: Literal["hf", "vllm"] = "hf"  # hf: HFGenerator; vllm: engine/vllm_engine.py (needs the vllm package)


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
    checkpoint_every: int = 1  # a SAMI step is long (B queries x N^2 responses) and an iteration has few of them
    keep_checkpoints: int = 1
    checkpoint_hash: Literal["all", "small", "none"] = "small"  # SHA-256 of checkpoint files (checkpoint.py)
    eval_every: int = 1
    master_weights: bool = True  # with model_dtype bfloat16: the optimiser steps fp32 copies (training.py)
    gradient_checkpointing: bool = False
    distributed: Literal["ddp", "fsdp"] = "ddp"  # under torchrun (training.py)
    timeout_minutes: int = 120  # of every collective (a process waiting for the others gives up after it)
    max_pairs_per_pass: int | None = (
        None  # gradient caching: passes of at most this many prompts or pairs (gradcache.py)
    )


@dataclass
class EvaluationSection:
    judge_queries: int = 0  # held-out queries judged trained-vs-base (0: no judge)
    judge: str = "base"  # "base", "trained", or a causal LM: a local directory or a hub id
    adherence_queries: int = 0  # held-out queries for the principles' judge-free measures (0: off)


@dataclass
class SAMIConfig:
    model: str = "smollm2"  # "smollm2", "tiny-random", a local directory or a hub id
    prompt_format: Literal["raw", "chat"] = "raw"  # chat: the tokenizer's chat template, constitution as system
    output_dir: str = "runs/sami"
    seed: int = 0
    precision: Literal["fp32", "bf16"] = "fp32"  # bf16: autocast (over the weights in model_dtype)
    model_dtype: Literal["float32", "bfloat16"] = "float32"  # the dtype the weights are loaded in
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
            "training.timeout_minutes": t.timeout_minutes,
            "data.heldout_queries": self.data.heldout_queries,
            "constitutions.n": self.constitutions.n - 1,
        }
        for key, value in positive.items():
            if value < 1:
                raise ValueError(f"{key} must be >= {2 if key == 'constitutions.n' else 1}")
        if t.max_pairs_per_pass is not None and t.max_pairs_per_pass < 1:
            raise ValueError("training.max_pairs_per_pass must be >= 1, or null (one pass over all pairs)")
        for key, template in (("generation.template", self.generation.template), ("training.template", t.template)):
            if template is not None and not 0 <= template.find("{constitution}") < template.find("{query}"):
                raise ValueError(f"{key} must contain {{constitution}} and, after it, {{query}}")
            if template is not None and self.prompt_format == "chat":
                raise ValueError(f"{key} is set, but prompt_format: chat builds the templates from the chat template")
        e = self.evaluation
        if e.judge_queries < 0 or e.adherence_queries < 0:
            raise ValueError("evaluation.judge_queries and evaluation.adherence_queries must be >= 0")
        if not e.judge.strip():
            raise ValueError("evaluation.judge must be 'base', 'trained', or a model directory / hub id")
