"""The machinery of one SELF-ALIGN run, kept out of the stages' way: output directory, tokenizer, models, seeding,
the previous stage's output."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from ...engine.generation import GenerationConfig, HFGenerator
from ...engine.models import resolve_model_path
from ..data import read_jsonl
from ..training import Processes, load_model, model_dtype
from .config import SelfAlignConfig


class Session:
    def __init__(self, config: SelfAlignConfig, *, make_generator=HFGenerator):
        """make_generator(model, tokenizer, generation_config, progress=None) -> an HFGenerator-like object with
        generate and generate_with_status, both taking seeds= (generation.py)."""
        self.config = c = config
        self.make_generator = make_generator
        self.out = Path(c.output_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        self.base_path = resolve_model_path(c.model)
        from transformers import AutoTokenizer
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        self.tokenizer = AutoTokenizer.from_pretrained(self.base_path)
        # under torchrun: the generation stages run on the main process while the others wait (main_only); the SFT
        # stages on every process (sft.py)
        self.procs = Processes(max(c.engraving.timeout_minutes, c.verbose.training.timeout_minutes))
        self.device = self.procs.device
        self.dtype = model_dtype(c.model_dtype)  # of every model loaded, trained or not
        self.show = c.progress
        self.system = (
            f"# System\nThis is a conversation between a user and {c.name}, an AI assistant that answers "
            "helpfully, honestly and harmlessly.\n\n"
        )

    def model(self, adapter: Path | None = None):
        return load_model(
            self.base_path, device=self.device, lora=None, adapter=adapter, trainable=False, dtype=self.dtype
        ).eval()

    def generator(self, model, generation: GenerationConfig, bar=None):
        return self.make_generator(model, self.tokenizer, generation, progress=None if bar is None else bar.update)

    def main_only(self, work):
        """work() on the main process (its result; None elsewhere), then every process goes on together."""
        result = work() if self.procs.is_main else None
        self.procs.barrier()
        return result

    def unit_seed(self, *unit: str) -> int:
        """The seed of one unit of work (an SFT stage, one generated item: its row's sampling seed): a stable hash of
        the config seed and the unit's names, the same in every process, so a resumed run draws exactly what an
        uninterrupted one draws, whichever batch an item lands in."""
        digest = hashlib.sha256(json.dumps([self.config.seed, *unit]).encode()).digest()
        return int.from_bytes(digest[:8], "little") % 2**63

    def needs(self, stage: str) -> list[dict]:
        path = self.out / f"stage{stage}.jsonl"
        if not path.exists():
            raise ValueError(f"stage {int(stage) + 1} reads {path}: run stage {stage} first")
        return read_jsonl(path)
