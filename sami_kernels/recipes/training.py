"""The parts every training loop here shares: processes, models (full or LoRA), optimisers, schedules, saving.

Multi-process runs start with torchrun; each process reads RANK / WORLD_SIZE / LOCAL_RANK and joins a gloo (CPU) or
NCCL (GPU) group whose collectives time out after `timeout_minutes`. The loops wrap their differentiable module (a
module whose forward scores a batch: PairScorer, ModelCall) by `distribute`:
    ddp:  DistributedDataParallel; every process holds the whole model, gradients all-reduced (averaged);
    fsdp: FSDP2, fully_shard on every decoder layer (the model's _no_split_modules) and then on the scoring module,
          which owns the rest (embeddings, final norm, output head): every parameter, gradient and optimiser state
          is a DTensor sharded over the processes (dim 0), a layer's parameters are gathered for its forward and
          backward only; gradients are reduce-scattered (averaged) after each backward.

Weights are loaded in `model_dtype` (float32 or bfloat16); a LoRA adapter is always float32 (peft upcasts it).
The optimiser steps `Trainable.params`: the model's trainable parameters, or with master_weights fp32 copies of
those that are not fp32, whose updates are copied (rounded) into the model after each step. Without master weights
a bfloat16 parameter is stepped in bfloat16 and an update below its resolution (|update| < 2^-8 |p|) is lost.
Bytes per trainable parameter, AdamW (two states of the stepped dtype; RMSprop: one):
    float32                                 4 weight + 4 grad + 8 AdamW                          = 16
    bfloat16, master_weights                2 weight + 2 grad + 4 master + 4 master grad + 8 AdamW  = 20
    bfloat16, no master weights             2 weight + 2 grad + 4 AdamW (bf16)                   = 8
(the master gradient, an fp32 copy of the gradient made for the step, lives from the step until zero_grad; the model's
gradient is freed as it is copied). A frozen parameter (LoRA's base) takes its weight's bytes alone. Under fsdp
every term is divided by the number of processes, plus the gathered (unsharded) weights and gradients of the layer
being computed; under ddp every process holds all of it (the gradients are views into DDP's buckets: no copy).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from dataclasses import dataclass
from datetime import timedelta
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


DISTRIBUTED_MODES = ("ddp", "fsdp")
MODEL_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


class Processes:
    """This process's place in a torchrun job (or a job of one); collectives time out after timeout_minutes."""

    def __init__(self, timeout_minutes: int = 120):
        if timeout_minutes < 1:
            raise ValueError(f"timeout_minutes must be >= 1, got {timeout_minutes}")
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        cuda = torch.cuda.is_available()
        self.device = torch.device(f"cuda:{local_rank}" if cuda else "cpu")
        if self.world > 1 and not dist.is_initialized():
            if cuda:
                torch.cuda.set_device(self.device)
            dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(minutes=timeout_minutes))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def sum(self, value: float) -> float:
        """The sum of a number over processes."""
        if self.world == 1:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.item()

    def gather(self, value) -> list:
        """Every process's (picklable) value, in rank order, on every process."""
        if self.world == 1:
            return [value]
        gathered = [None] * self.world
        dist.all_gather_object(gathered, value)
        return gathered

    def mean(self, value: float) -> float:
        """The mean of a number over processes."""
        return self.sum(value) / self.world

    def close(self) -> None:
        if self.world > 1 and dist.is_initialized():
            dist.destroy_process_group()


def model_dtype(name: str) -> torch.dtype:
    if name not in MODEL_DTYPES:
        raise ValueError(f"model_dtype must be one of {list(MODEL_DTYPES)}, got {name!r}")
    return MODEL_DTYPES[name]


def add_lora(model, lora: LoRAConfig):
    """model with a fresh peft LoRA adapter (float32, whatever the model's dtype)."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=list(lora.target_modules),
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config, autocast_adapter_dtype=True)


def load_model(
    path,
    *,
    device,
    lora: LoRAConfig | None,
    adapter=None,
    trainable: bool = True,
    dtype: torch.dtype = torch.float32,
    gradient_checkpointing: bool = False,
):
    """A causal LM with weights in `dtype`, optionally with a float32 LoRA adapter: a fresh one (lora) or a saved one
    (adapter, a directory written by save_pretrained_atomic); gradient_checkpointing recomputes each decoder layer's
    activations in the backward (non-reentrant, so frozen inputs and the pair engine's tree path work)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device)
    if gradient_checkpointing:
        enable_activation_checkpointing(model)
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter, is_trainable=trainable, autocast_adapter_dtype=True)
    elif lora is not None:
        model = add_lora(model, lora)
    if not trainable:
        model.requires_grad_(False)
    return model


def enable_activation_checkpointing(model) -> None:
    """Non-reentrant activation checkpointing of every decoder layer (transformers >= 5.x names it
    activation_checkpointing_enable, earlier versions gradient_checkpointing_enable)."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


class ModelCall(torch.nn.Module):
    """score(model, *inputs) as a module's forward, so that DistributedDataParallel and FSDP see the forward call
    they hook into (engine/pairs.PairScorer is this for the pair engine)."""

    def __init__(self, model, score):
        super().__init__()
        self.model, self.score = model, score

    def forward(self, *inputs):
        return self.score(self.model, *inputs)


def distribute(scorer: torch.nn.Module, model, procs: Processes, mode: str) -> torch.nn.Module:
    """The scoring module `scorer` (whose forward runs `model`) as the processes train it: itself in a job of one;
    ddp: DistributedDataParallel(scorer); fsdp: fully_shard on each decoder layer of `model`, then on scorer (module
    docstring). Build the optimiser after this: fsdp replaces the parameters by sharded ones."""
    if mode not in DISTRIBUTED_MODES:
        raise ValueError(f"training.distributed must be one of {list(DISTRIBUTED_MODES)}, got {mode!r}")
    if procs.world == 1:
        return scorer
    if mode == "ddp":
        return torch.nn.parallel.DistributedDataParallel(scorer, gradient_as_bucket_view=True)
    from torch.distributed.fsdp import fully_shard

    for layer in decoder_layers(model):
        fully_shard(layer)
    fully_shard(scorer)
    return scorer


def decoder_layers(model) -> list[torch.nn.Module]:
    """The repeated blocks of a Hugging Face model (the classes its _no_split_modules names), peft-wrapped or not."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    names = set(getattr(base, "_no_split_modules", None) or ())
    layers = [m for m in base.modules() if type(m).__name__ in names]
    if not layers:
        raise ValueError(f"{type(base).__name__} names no decoder layer class (_no_split_modules) to shard")
    return layers


def is_sharded(module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)


def accumulating(scorer, last: bool):
    """The context of a backward that accumulates gradients: under DDP, without the all-reduce except on the last
    micro-batch (no_sync); under FSDP every backward reduce-scatters into the sharded gradients (no unsharded
    gradients are kept between micro-batches)."""
    if last or not isinstance(scorer, torch.nn.parallel.DistributedDataParallel):
        return contextlib.nullcontext()
    return scorer.no_sync()


class Trainable:
    """What the optimiser steps, by parameter name: the model's trainable parameters, or with master_weights fp32
    copies of those that are not fp32 (module docstring). Call step_gradients() before clipping and stepping the
    optimiser, refresh_model() after."""

    def __init__(self, model, *, master_weights: bool):
        self.model_params = {name: p for name, p in model.named_parameters() if p.requires_grad}
        self.params = {
            name: torch.nn.Parameter(p.detach().float().clone()) if master_weights and p.dtype != torch.float32 else p
            for name, p in self.model_params.items()
        }

    def parameters(self) -> list[torch.nn.Parameter]:
        return list(self.params.values())

    @property
    def sharded(self) -> bool:
        from torch.distributed.tensor import DTensor

        return any(isinstance(p, DTensor) for p in self.params.values())

    def copies(self):
        return ((p, self.params[name]) for name, p in self.model_params.items() if self.params[name] is not p)

    def step_gradients(self) -> None:
        """The model's gradients onto the fp32 copies (freeing the model's)."""
        for p, master in self.copies():
            master.grad = None if p.grad is None else p.grad.float()
            p.grad = None

    @torch.no_grad()
    def refresh_model(self) -> None:
        """The stepped fp32 copies, rounded, into the model's parameters."""
        for p, master in self.copies():
            p.copy_(master)

    def state(self) -> dict[str, torch.Tensor]:
        return {name: p.detach() for name, p in self.params.items()}

    @torch.no_grad()
    def load_state(self, tensors: dict[str, torch.Tensor]) -> None:
        if set(self.params) != set(tensors):
            missing, extra = sorted(set(self.params) - set(tensors)), sorted(set(tensors) - set(self.params))
            raise ValueError(f"checkpoint does not match the model: missing {missing[:5]}, unexpected {extra[:5]}")
        for name, p in self.params.items():
            p.copy_(tensors[name])
        self.refresh_model()


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


def save_pretrained_atomic(model, tokenizer, path, procs: Processes | None = None) -> Path:
    """model.save_pretrained (full weights, or the adapter of a peft model) + tokenizer, renamed into place, by the
    main process (every process calls it; a sharded model is gathered to the main process first, one parameter at a
    time, onto the CPU)."""
    path = Path(path)
    state_dict = full_state_dict(model) if procs is not None and procs.world > 1 else None
    if procs is None or procs.is_main:
        path.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{path.name}-", dir=path.parent))
        try:
            model.save_pretrained(staging, safe_serialization=True, state_dict=state_dict)
            tokenizer.save_pretrained(staging)
            if path.exists():
                shutil.rmtree(path)
            os.replace(staging, path)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    if procs is not None:
        procs.barrier()
    return path


def full_state_dict(model) -> dict[str, torch.Tensor] | None:
    """The whole state dict of a model with sharded (DTensor) parameters, on the main process's CPU; None for a model
    that is not sharded (it saves its own) and on the other processes."""
    from torch.distributed.tensor import DTensor

    if not any(isinstance(p, DTensor) for p in model.parameters()):
        return None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return state if dist.get_rank() == 0 else None


def is_adapter_dir(path) -> bool:
    return (Path(path) / "adapter_config.json").exists()


def apply_update(trainable: Trainable, optimizer, scheduler, max_grad_norm: float) -> tuple[float, float]:
    """Clip (max_grad_norm > 0), step the optimiser and the schedule, refresh the model from fp32 copies, clear the
    gradients: (grad norm, lr used)."""
    trainable.step_gradients()
    norm = clip_gradients(trainable.parameters(), max_grad_norm) if max_grad_norm > 0 else float("nan")
    lr = scheduler.get_last_lr()[0]
    optimizer.step()
    scheduler.step()
    trainable.refresh_model()
    optimizer.zero_grad(set_to_none=True)
    return norm, lr


def clip_gradients(params, max_grad_norm: float) -> float:
    """Scale the gradients to a total norm of at most max_grad_norm (over every process's shards); the norm before."""
    from torch.distributed.tensor import DTensor

    norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
    return (norm.full_tensor() if isinstance(norm, DTensor) else norm).item()


def save_training_checkpoint(
    root, step: int, trainable: Trainable, optimizer, scheduler, procs: Processes, *, counters: dict, keep_last, hashing
) -> None:
    """Checkpoint `step` of a training loop (every process calls it): the stepped weights, the optimiser, the
    schedule, the main process's RNG states and the counters. Sharded (FSDP) weights and optimiser states go to
    torch.distributed.checkpoint files written by every process; otherwise the main process writes them."""
    from .checkpoint import rng_state, save_checkpoint, save_sharded_checkpoint

    state = {**counters, "scheduler": scheduler.state_dict(), "rng": rng_state()}
    options = {"keep_last": keep_last, "hashing": hashing}
    if trainable.sharded:
        state["param_groups"] = optimizer.state_dict()["param_groups"]
        save_sharded_checkpoint(root, step, sharded_state(trainable, optimizer), state, procs, **options)
        return
    if procs.is_main:
        save_checkpoint(root, step, trainable.state(), {**state, "optimizer": optimizer.state_dict()}, **options)
    procs.barrier()


def restore_training_state(checkpoint, trainable: Trainable, optimizer, scheduler) -> dict:
    """Load a checkpoint (step, weights, state) of checkpoint.load_latest into the stepped weights (and the model),
    the optimiser, the schedule and the RNGs; returns the state. A sharded one is read by every process at once."""
    from torch.distributed.checkpoint import load

    from .checkpoint import set_rng_state

    _, weights, state = checkpoint
    if isinstance(weights, Path) != trainable.sharded:
        raise ValueError(
            f"the checkpoint is {'sharded' if isinstance(weights, Path) else 'not sharded'} but this run's weights "
            f"are {'sharded' if trainable.sharded else 'not sharded'}: training.distributed changed; use the same "
            "setting to resume, or another output_dir"
        )
    if trainable.sharded:
        initialise_optimizer_state(trainable, optimizer)
        with torch.no_grad():
            load(sharded_state(trainable, optimizer), checkpoint_id=weights)
        for group, saved in zip(optimizer.param_groups, state["param_groups"], strict=True):
            group.update({key: value for key, value in saved.items() if key != "params"})
        trainable.refresh_model()
    else:
        trainable.load_state(weights)
        optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    set_rng_state(state["rng"])
    return state


def sharded_state(trainable: Trainable, optimizer) -> dict:
    """What a sharded checkpoint holds, by parameter name: the stepped weights and their optimiser states."""
    return {
        "weights": trainable.params,
        "optimizer": {name: optimizer.state[p] for name, p in trainable.params.items()},
    }


def initialise_optimizer_state(trainable: Trainable, optimizer) -> None:
    """Give every parameter its optimiser state (a step with zero gradients and lr 0, which moves nothing), so that a
    sharded checkpoint can be read into it in place."""
    for p in trainable.parameters():
        p.grad = torch.zeros_like(p)
    rates = [group["lr"] for group in optimizer.param_groups]
    for group in optimizer.param_groups:
        group["lr"] = 0.0
    optimizer.step()
    for group, lr in zip(optimizer.param_groups, rates, strict=True):
        group["lr"] = lr
    optimizer.zero_grad(set_to_none=True)
