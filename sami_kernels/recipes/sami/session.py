"""The machinery of one SAMI run, kept out of the algorithm's way: processes, output directory, tokenizer, models,
files made once by the main process, the metrics log. Every process of a torchrun job builds one."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import yaml
from tqdm.auto import tqdm

from ...engine.generation import HFGenerator, ShardedGenerator
from ...engine.models import resolve_model_path
from ..config import to_mapping
from ..data import read_jsonl, write_jsonl, write_text
from ..metrics import MetricsLog
from ..stage_file import StageFile
from ..training import Processes, is_adapter_dir, load_model, model_dtype
from .config import PRESETS, SAMIConfig, prompt_templates
from .constitutions import PrincipleSet, load_principle_set


class Session:
    def __init__(self, config: SAMIConfig, *, make_generator=HFGenerator):
        """make_generator(model, tokenizer, generation_config, progress=None) -> a Generator (engine/generation.py)."""
        config.validate()
        self.config = c = config
        self.make_generator = make_generator
        self.procs = Processes(c.training.timeout_minutes)
        self.out = Path(c.output_dir)
        self.principles: PrincipleSet = load_principle_set(c.constitutions.set)
        self.task = self.principles.task if self.principles.task in PRESETS else "dialogue"
        if c.evaluation.adherence_queries and not any(p.measure for p in self.principles.principles):
            raise ValueError(
                f"evaluation.adherence_queries = {c.evaluation.adherence_queries}, but no principle of "
                f"constitutions.set {c.constitutions.set!r} declares a measure"
            )
        if c.training.batch_queries % self.procs.world:
            raise ValueError(
                f"training.batch_queries = {c.training.batch_queries} must divide evenly over {self.procs.world} "
                "processes"
            )
        if self.procs.is_main:
            resolve_model_path(c.model)  # may build or convert the model once
        self.procs.barrier()
        self.base_path = resolve_model_path(c.model)
        from transformers import AutoTokenizer
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # per-load bars would drown the loop's own
        self.tokenizer = AutoTokenizer.from_pretrained(self.base_path)
        generation, training = prompt_templates(c.prompt_format, self.task, self.tokenizer)
        self.generation_template = c.generation.template or generation
        self.training_template = c.training.template or training
        self.show = c.progress and self.procs.is_main
        self.log: MetricsLog | None = None

    def start(self, resume_step: int | None) -> None:
        """Refuse an output_dir written under another config, record this one, open the metrics log."""
        self.check_same_run()
        self.procs.barrier()
        if self.procs.is_main:
            write_text(self.out / "config.yaml", yaml.safe_dump(to_mapping(self.config), sort_keys=False))
        self.log = MetricsLog(
            self.out / "metrics.jsonl",
            resume_step=resume_step,
            tensorboard_dir=self.out / "tensorboard" if self.config.tensorboard else None,
            enabled=self.procs.is_main,
        )

    def check_same_run(self) -> None:
        """Resuming reuses samples, checkpoints and metrics: refuse an output_dir written under another config."""
        saved = self.out / "config.yaml"
        if not saved.exists():
            return
        display_only = ("progress", "tensorboard")
        before = {k: v for k, v in yaml.safe_load(saved.read_text(encoding="utf-8")).items() if k not in display_only}
        now = {k: v for k, v in to_mapping(self.config).items() if k not in display_only}
        if before != now:
            changed = sorted(k for k in before.keys() | now.keys() if before.get(k) != now.get(k))
            raise ValueError(
                f"output_dir {self.out} holds a run made with a different config (sections {changed} differ); "
                "use another output_dir, or delete this one to start over"
            )

    def once(self, path: Path, make) -> list[dict]:
        """Records from path, made by the main process (make() -> (records, counts)) and written atomically once."""
        if self.procs.is_main and not path.exists():
            records, counts = make()
            if not records:
                raise ValueError(f"every query was filtered out while making {path} ({counts})")
            write_jsonl(path, records)
            write_text(path.with_suffix(".counts.json"), json.dumps(counts, indent=1) + "\n")
            if self.show:
                tqdm.write(f"{path}: {counts}")
        self.procs.barrier()
        return read_jsonl(path)

    def main_only(self, work) -> None:
        """work() on the main process while the others wait."""
        if self.procs.is_main:
            work()
        self.procs.barrier()

    def iteration_dir(self, t: int) -> Path:
        return self.out / f"iter-{t}" / "model"

    def load(self, trained_dir: Path | None, *, trainable: bool, fresh_lora: bool = False):
        """Base model, base + a saved adapter, or a saved full model, in model_dtype; fresh_lora adds a new LoRA
        adapter; a trainable one checkpoints its activations when training.gradient_checkpointing says so."""
        tc = self.config.training
        options = {
            "device": self.procs.device,
            "trainable": trainable,
            "dtype": model_dtype(self.config.model_dtype),
            "gradient_checkpointing": trainable and tc.gradient_checkpointing,
        }
        if trained_dir is not None and is_adapter_dir(trained_dir):
            return load_model(self.base_path, lora=None, adapter=trained_dir, **options)
        path = trained_dir if trained_dir is not None else self.base_path
        return load_model(path, lora=tc.lora if fresh_lora else None, **options)

    def generator(self, model_dir: Path | None, generation, progress=None, *, log: str | None = None, model=None):
        """Every process's share of the generation of the model saved in model_dir (None: the base model; `model`:
        that model already loaded, for the hf engine) on generation.engine, as a ShardedGenerator (generation.py):
        with `log`, each finished batch is appended to output_dir/stage-<log>.log.jsonl by the main process and a
        re-run skips the batches logged there (recipes/stage_file.py)."""
        if generation.engine == "vllm":
            from ...engine.vllm_engine import VLLMGenerator

            adapter = model_dir if model_dir is not None and is_adapter_dir(model_dir) else None
            path = model_dir if model_dir is not None and adapter is None else self.base_path
            engine = VLLMGenerator(path, self.tokenizer, generation, adapter=adapter, dtype=self.config.model_dtype)
        else:
            loaded = model if model is not None else self.load(model_dir, trainable=False)
            engine = self.make_generator(loaded, self.tokenizer, generation)
        journal = StageFile(self.out, f"-{log}") if log is not None and self.procs.is_main else None
        return ShardedGenerator(engine, generation.batch_size, journal=journal, progress=progress)

    def autocast(self):
        enabled = self.config.precision == "bf16"
        return torch.autocast(self.procs.device.type, dtype=torch.bfloat16, enabled=enabled)
