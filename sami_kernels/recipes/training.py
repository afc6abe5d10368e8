"""The parts every training loop here shares: processes, models (full or LoRA), optimisers, schedules, saving.

Multi-process runs start with torchrun; each process reads RANK / WORLD_SIZE / LOCAL_RANK, joins a gloo (CPU) or
NCCL (GPU) group, and the loops wrap their differentiable module in DistributedDataParallel.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.distributed as dist


@dataclass
class LoRAConfig:
    r: int = 16
    alpha: int = 16
    dropout: float = 0.05
    target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")


@dataclass
class OptimizerConfig:
    name: Literal["adamw", "rmsprop"] = "adamw"
    lr: float = 5e-7
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)  # adamw
    eps: float = 1e-8
    warmup_steps: int = 0
    schedule: Literal["constant", "linear"] = "constant"  # linear: decays to 0 at the last step
    max_grad_norm: float = 1.0  # 0 disables clipping


class Processes:
    """This process's place in a torchrun job (or a job of one)."""

    def __init__(self):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        cuda = torch.cuda.is_available()
        self.device = torch.device(f"cuda:{local_rank}" if cuda else "cpu")
        if self.world > 1 and not dist.is_initialized():
            if cuda:
                torch.cuda.set_device(self.device)
            dist.init_process_group("nccl" if cuda else "gloo")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def mean(self, value: float) -> float:
        """The mean of a number over processes."""
        if self.world == 1:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.item() / self.world

    def close(self) -> None:
        if self.world > 1 and dist.is_initialized():
            dist.destroy_process_group()


def load_model(path, *, device, lora: LoRAConfig | None, adapter=None, trainable: bool = True):
    """A causal LM in float32 (bf16 runs use autocast over fp32 master weights), optionally with a LoRA adapter:
    a fresh one (lora) or a saved one (adapter, a directory written by save_pretrained_atomic)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(device)
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter, is_trainable=trainable)
    elif lora is not None:
        from peft import LoraConfig, get_peft_model

        config = LoraConfig(
            r=lora.r,
            lora_alpha=lora.alpha,
            lora_dropout=lora.dropout,
            target_modules=list(lora.target_modules),
            task_type="CAUSAL_LM",
        )
        model = get_peft_model(model, config)
    if not trainable:
        model.requires_grad_(False)
    return model


def trainable_state(model) -> dict[str, torch.Tensor]:
    """The parameters an optimiser updates (all of them, or the LoRA adapter), by name."""
    return {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}


def load_trainable_state(model, tensors: dict[str, torch.Tensor]) -> None:
    expected = trainable_state(model)
    if set(expected) != set(tensors):
        missing, extra = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
        raise ValueError(f"checkpoint does not match the model: missing {missing[:5]}, unexpected {extra[:5]}")
    with torch.no_grad():
        for name, p in expected.items():
            p.copy_(tensors[name])


def build_optimizer(params, config: OptimizerConfig) -> torch.optim.Optimizer:
    if config.name == "adamw":
        return torch.optim.AdamW(
            params, lr=config.lr, betas=config.betas, eps=config.eps, weight_decay=config.weight_decay
        )
    return torch.optim.RMSprop(params, lr=config.lr, eps=config.eps, weight_decay=config.weight_decay)


def build_scheduler(optimizer, config: OptimizerConfig, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up over warmup_steps, then constant or linear decay to 0 at total_steps."""

    def factor(step: int) -> float:
        if step < config.warmup_steps:
            return (step + 1) / (config.warmup_steps + 1)
        if config.schedule == "linear":
            return max(0.0, (total_steps - step) / max(1, total_steps - config.warmup_steps))
        return 1.0

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def save_pretrained_atomic(model, tokenizer, path) -> Path:
    """model.save_pretrained (full weights, or the adapter of a peft model) + tokenizer, renamed into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}-", dir=path.parent))
    try:
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        if path.exists():
            shutil.rmtree(path)
        os.replace(staging, path)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return path


def is_adapter_dir(path) -> bool:
    return (Path(path) / "adapter_config.json").exists()


def apply_update(params, optimizer, scheduler, max_grad_norm: float) -> tuple[float, float]:
    """Clip (max_grad_norm > 0), step the optimiser and the schedule, clear the gradients: (grad norm, lr used)."""
    norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm).item() if max_grad_norm > 0 else float("nan")
    lr = scheduler.get_last_lr()[0]
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return norm, lr


def training_state(optimizer, scheduler, **counters) -> dict:
    """What a checkpoint holds besides the trainable weights."""
    from .checkpoint import rng_state

    return {**counters, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": rng_state()}


def restore_training_state(checkpoint, model, optimizer, scheduler) -> dict:
    """Load a checkpoint (step, tensors, state) into the model, optimiser, schedule and RNGs; returns the state."""
    from .checkpoint import set_rng_state

    _, tensors, state = checkpoint
    load_trainable_state(model, tensors)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    set_rng_state(state["rng"])
    return state
