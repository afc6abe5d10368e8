"""The SAMI loop's configuration: one dataclass per YAML section (every key checked, recipes/config.py), and the
prompt presets per task."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from ...engine.generation import GenerationConfig
from ..training import LoRAConfig, OptimizerConfig

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
