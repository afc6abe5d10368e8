"""SELF-ALIGN (Sun et al. 2023, Dromedary): four stages from a base model and a few written principles.

    1  prompts:   vanilla self-instruct from seed tasks, and topic-guided red-teaming (TGRT): topics brainstormed
                  per adversarial question type, then one question per (type, topic); the paper's filters
    2  answers:   rules + exemplars prefix (encoded once, its KV cache reused for every query), internal thoughts,
                  sampled answers (T 0.5, top-p 0.95, the answer's first token may not be "Sorry"), the post-filters
    3  engrave:   SFT of the BASE model on (query, answer) with only a short system prompt (LoRA by default)
    4  verbose:   the stage-3 model answers under a teacher prompt asking for extensive answers (3/4-gram frequency
                  penalties); filtered; a FRESH LoRA on the base model is fine-tuned on them
    eval:         multiple-choice accuracy (true/false margin; A/B in both orders) of base, stage-3, stage-4 models

Each stage reads the previous stage's JSONL under output_dir and writes its own (stage1.jsonl, stage2.jsonl,
stage3/model, stage4.jsonl, stage4/model, eval.json), with counts per filter reason (stage<k>.counts.json).
Generation stages append every finished batch to stage<k>.log.jsonl (fsync'ed, whole or not at all) and write their
outputs atomically from it when the stage ends; a re-run skips every unit of work already logged. Every generated item
is sampled with its own seed (config seed, stage, item), and each SFT stage shuffles its data with its own seed
(config seed, stage): a resumed run writes and trains on exactly what an uninterrupted one does.

Under torchrun the SFT of stages 3 and 4 runs on every process (sft.py: ddp or fsdp); the generation (stages 1, 2,
stage 4's answers, eval) runs on the main process while the others wait, so the collectives' timeout
(training.timeout_minutes of engraving / verbose.training) must cover it.
"""

from __future__ import annotations

import functools

from tqdm.auto import tqdm

from .answers import write_answers
from .config import STAGES, SelfAlignConfig
from .evaluation import evaluate
from .finetune import engrave, verbose_clone
from .prompts import write_prompts
from .session import Session

STEPS = {"1": write_prompts, "2": write_answers, "3": engrave, "4": verbose_clone, "eval": evaluate}
EVERY_PROCESS = ("3", "4")  # their SFT runs on every process; the other stages on the main one (main_only)


def run_self_align(config: SelfAlignConfig, stage: str = "all", **options) -> dict:
    """Stage `stage` (or all of them, in order); each returns its report (on the main process; {} elsewhere).
    options: make_generator (session.py)."""
    if stage not in ("all", *STAGES):
        raise ValueError(f"--stage must be one of all, {', '.join(STAGES)}; got {stage!r}")
    session = Session(config, **options)
    report = {}
    for name in STAGES if stage == "all" else (stage,):
        step = functools.partial(STEPS[name], session)
        report[name] = step() if name in EVERY_PROCESS else session.main_only(step)
        if session.show and session.procs.is_main:
            tqdm.write(f"stage {name}: {report[name]}")
    session.procs.close()
    return report if session.procs.is_main else {}


def print_report(report: dict) -> None:
    if not report:  # processes other than the main one
        return
    print("\nSELF-ALIGN report")
    for stage, values in report.items():
        print(
            f"  stage {stage}: "
            + ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in values.items())
        )
