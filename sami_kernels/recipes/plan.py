"""`sami-kernels plan`: per-rank GPU memory of a SAMI or SELF-ALIGN config for DDP vs FSDP2, float32 vs bfloat16
weights, gradient checkpointing off vs on, before anything is downloaded or allocated.

The model is built from its config.json on the meta device (transformers' from_config under torch.device("meta"),
peft's LoRA applied when the config asks for one), so parameter counts are exact and no weight is read.

States (bytes per parameter; training.py's design). A frozen parameter (LoRA's base) holds its weight only; a LoRA
adapter is float32 whatever the weights' dtype. b = 4 for float32 weights, 2 for bfloat16.
    weights     b (adapter 4)
    grads       b (adapter 4); ddp's buckets hold them (gradient_as_bucket_view), no second copy
    master      bfloat16 weights with training.master_weights: an fp32 copy of each trainable bfloat16 parameter and
                its fp32 gradient for the step (4 + 4); nothing otherwise
    optimizer   AdamW two states, RMSprop one, each in the stepped dtype (fp32 with master weights, else b)
fsdp (FSDP2: fully_shard per decoder layer, then the root owning the embeddings, final norm and head) divides every
term by the world size and adds the unsharded units: the root's weights and gradients (the root is not resharded
between forward and backward) and two decoder layers' weights (the one computed and the one prefetched) with one
layer's gradients (before its reduce-scatter).

Activations: the bytes autograd saves for backward in one micro-batch's forward, with SDPA attention given a mask
(the pair engine and packed rows always pass one, so transformers repeats the K/V heads to the query heads). Each
op of a Llama / Mistral decoder layer saves, per token (h hidden, i intermediate, n heads, d head_dim, b bytes of
the activations, which are in the weights' dtype):
    2 RMSNorms      x upcast to fp32 (4h: pow and mul), rsqrt (4), the normalised x for the weight's grad (bh)
    q/k/v, gate/up  their input, the norm's output (bh each group)
    SDPA            q (bh), output (bh; o_proj's input is the same storage), logsumexp (4n); K and V at every key
                    position (2 n d b), and the mask as a float bias (b per query x key entry)
    MLP             SiLU's input g, the product's s = silu(g) and u, down's input s * u (4 bi)
    => a = 8h + 8 + 4n + b (6h + 4i)                                   per token per layer, K/V and mask apart
With LoRA the base weights are frozen: a frozen linear keeps no input and a norm keeps no normalised x, so
    a = 8h + 8 + 4n + b (2h + 3i) + sum over adapted modules (4 in + 4 r + [dropout > 0] in)
(the adapter's fp32 input, its rank-r hidden and CUDA's 1-byte dropout mask; counted per module, exact unless
float32 weights without dropout let q, k and v share one input), and the first layer's input norm keeps nothing
(its input needs no gradient). Once per token: input ids (8), RoPE cos and sin (2db), the final norm (4h + 4, + bh
with a trainable weight); per scored token, the head through the fused kernels (never [tokens x vocab] logits): the
hidden state, target and log-sum-exp (bh + 12) or, with a frozen head, d logp / d hidden (4h), plus the engine's
gather index (8).

Micro-batches. SAMI's pair engine (engine/pairs.py, groups.py), B = training.micro_batch_queries queries per rank, N
constitutions, prompts of P tokens, responses of R tokens:
    cache path   prefix pass of B N P tokens (keys: B N P, mask B N P^2), response pass of B N^2 R tokens whose
                 rows each hold their prefix's K/V (keys: B N^2 (P + R), mask B N^2 R (P + R)): the repeated prefix
                 KV cache is B N^2 P key positions per layer
    tree path    one packed row per prompt of P + N R tokens, every K/V once, a dense tree mask per row
SELF-ALIGN's SFT: one packed row of pack_tokens tokens (block-diagonal mask); every token counted as scored.
Gradient checkpointing (HF, per decoder layer): each layer keeps its input (bh per token), and the backward
recomputes one layer at a time (one layer's a, K/V and mask on top). The pair engine's attn="auto" takes the tree
path under checkpointing (no cache survives it); attn="cache" is refused there.
tests/test_plan.py checks these against the bytes autograd saves for a pair-engine forward on the CPU (full and
LoRA, float32 and bfloat16; within 1%, measured 0.03-0.14% over). Not counted: the CUDA context, allocator
fragmentation, backward temporaries, communication buffers, and autocast (precision: bf16 over float32 weights is
planned as float32 activations).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from ..engine.models import resolve_model_path
from .config import load_config
from .training import MODEL_DTYPES, LoRAConfig, add_lora, decoder_layers

DEFAULT_PROMPT_TOKENS = 512  # P: the paper's prompts are ~450 tokens (Mistral-7B, N = 4)
GIB = 2**30
BYTES = {name: dtype.itemsize for name, dtype in MODEL_DTYPES.items()}  # float32 4, bfloat16 2
OPTIMIZER_STATES = {"adamw": 2, "rmsprop": 1}


@dataclass(frozen=True)
class Choices:
    """What a config chose for one training section: the axes of the plan and what is fixed."""

    model_dtype: str = "float32"
    master_weights: bool = True
    gradient_checkpointing: bool = False
    distributed: str = "ddp"
    optimizer: str = "adamw"
    attn: str = ""  # the pair engine's training.attn; "" for SFT's packed rows
    lora: LoRAConfig | None = None


def choices(config, section) -> Choices:
    """The scale keys of a config (top-level model_dtype) and of one of its training sections (SAMI's training,
    SELF-ALIGN's engraving and verbose.training)."""
    return Choices(
        model_dtype=config.model_dtype,
        master_weights=section.master_weights,
        gradient_checkpointing=section.gradient_checkpointing,
        distributed=section.distributed,
        optimizer=section.optimizer.name,
        attn=getattr(section, "attn", ""),  # SFT sections have none
        lora=section.lora,
    )


@dataclass(frozen=True)
class Counts:
    """Parameter counts of a unit (the whole model, the root, one decoder layer): frozen, trainable base (in the
    weights' dtype) and trainable LoRA adapter (float32)."""

    frozen: int = 0
    base: int = 0
    adapter: int = 0

    @property
    def total(self) -> int:
        return self.frozen + self.base + self.adapter


@dataclass(frozen=True)
class ModelShape:
    name: str
    model: Counts
    root: Counts  # what FSDP2's root unit owns: embeddings, final norm, head
    layer: Counts  # the largest decoder layer
    layers: int
    hidden: int
    intermediate: int
    heads: int
    head_dim: int
    adapted_inputs: tuple[int, ...]  # in_features of each LoRA-adapted module of one layer
    lora_r: int
    lora_dropout: float


def meta_model(spec: str, lora: LoRAConfig | None):
    """The causal LM of config `model` on the meta device (float32), with a fresh LoRA adapter when asked."""
    from transformers import AutoConfig, AutoModelForCausalLM

    path = resolve_model_path(spec)
    try:
        config = AutoConfig.from_pretrained(path)
    except OSError as error:
        raise ValueError(f"model: cannot read the config.json of {spec!r} ({error})") from None
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return model if lora is None else add_lora(model, lora)


def _counts(named_parameters) -> Counts:
    frozen = base = adapter = 0
    for name, p in named_parameters:
        if not p.requires_grad:
            frozen += p.numel()
        elif "lora_" in name:
            adapter += p.numel()
        else:
            base += p.numel()
    return Counts(frozen, base, adapter)


def model_shape(spec: str, lora: LoRAConfig | None) -> ModelShape:
    """The shape of config `model` (with the LoRA adapter asked for), from the meta device."""
    return shape_of(meta_model(spec, lora), spec, lora)


def shape_of(model, name: str, lora: LoRAConfig | None) -> ModelShape:
    """The counts and sizes of a causal LM (peft-wrapped when lora is given) that the plan's formulas use."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    layers = decoder_layers(model)
    in_layers = {id(p) for m in layers for p in m.parameters()}
    config = base.config
    return ModelShape(
        name=name,
        model=_counts(model.named_parameters()),
        root=_counts((n, p) for n, p in model.named_parameters() if id(p) not in in_layers),
        layer=max((_counts(m.named_parameters()) for m in layers), key=lambda c: c.total),
        layers=len(layers),
        hidden=config.hidden_size,
        intermediate=config.intermediate_size,
        heads=config.num_attention_heads,
        head_dim=getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads,
        adapted_inputs=tuple(m.in_features for m in layers[0].modules() if hasattr(m, "lora_A")),
        lora_r=lora.r if lora else 0,
        lora_dropout=lora.dropout if lora else 0.0,
    )


@dataclass(frozen=True)
class Workload:
    """The tokens of one micro-batch, summed over its rows."""

    tokens: int  # through the decoder
    scored: int  # through the head
    keys: int  # K/V positions saved by attention
    mask: int  # query x key entries of the attention masks
    note: str


def pair_workload(B: int, N: int, P: int, R: int, path: str) -> Workload:
    """SAMI's micro-batch through the pair engine's cache or tree path (module docstring)."""
    prefix, response = B * N * P, B * N * N * R
    split = f"prefix tokens B N P = {prefix:,}, response tokens B N^2 R = {response:,}"
    if path == "cache":
        keys, mask = B * N * P + B * N * N * (P + R), B * N * P * P + B * N * N * R * (P + R)
        note = f"cache path: {split}; the prefix KV cache repeated per response: B N^2 P = {B * N * N * P:,} keys"
    else:
        row = P + N * R
        keys, mask = B * N * row, B * N * row * row
        note = f"tree path: {split}, in B N = {B * N} packed row(s) of P + N R = {row:,} tokens with a tree mask"
    return Workload(prefix + response, response, keys, mask, note)


def packed_workload(pack_tokens: int) -> Workload:
    """SELF-ALIGN's SFT micro-batch: one packed row, every token scored (an upper bound), a block-diagonal mask."""
    note = f"one packed row of pack_tokens = {pack_tokens:,} tokens per micro-batch"
    return Workload(pack_tokens, pack_tokens, pack_tokens, pack_tokens * pack_tokens, note)


def layer_token_bytes(shape: ModelShape, b: int) -> int:
    """a: bytes one decoder layer saves per token, K/V and mask apart (module docstring)."""
    h, i = shape.hidden, shape.intermediate
    common = 8 * h + 8 + 4 * shape.heads
    if not shape.lora_r:
        return common + b * (6 * h + 4 * i)
    mask = 1 if shape.lora_dropout > 0 else 0
    return common + b * (2 * h + 3 * i) + sum((4 + mask) * f + 4 * shape.lora_r for f in shape.adapted_inputs)


def activation_bytes(shape: ModelShape, work: Workload, b: int, checkpointing: bool) -> int:
    """Bytes saved for backward by one micro-batch (module docstring)."""
    h, full = shape.hidden, not shape.lora_r
    one_layer = (
        layer_token_bytes(shape, b) * work.tokens + 2 * shape.heads * shape.head_dim * b * work.keys + b * work.mask
    )
    per_token = 8 + 2 * shape.head_dim * b + 4 * h + 4 + (b * h if full else 0)
    head = work.scored * ((b * h + 12 if full else 4 * h) + 8)  # a frozen head (LoRA) keeps d logp / d hidden
    once = per_token * work.tokens + head
    if checkpointing:
        return shape.layers * b * h * work.tokens + one_layer + once
    first_norm = 0 if full else (4 * h + 4) * work.tokens  # LoRA: layer 0's input norm saves nothing
    return shape.layers * one_layer + once - first_norm


@dataclass(frozen=True)
class Plan:
    distributed: str
    model_dtype: str
    checkpointing: bool
    path: str  # the pair engine's attention path, "" for SFT, "refused" where the engine refuses
    weights: int
    grads: int
    master: int
    optimizer: int
    activations: int

    @property
    def total(self) -> int:
        return self.weights + self.grads + self.master + self.optimizer + self.activations


def state_bytes(c: Counts, b: int, master_weights: bool, states: int) -> tuple[int, int, int, int]:
    """(weights, grads, master, optimizer) bytes of a unit's parameters (module docstring)."""
    master = b < 4 and master_weights
    stepped = 4 if master or b == 4 else b
    return (
        (c.frozen + c.base) * b + 4 * c.adapter,
        c.base * b + 4 * c.adapter,
        8 * c.base if master else 0,
        states * (stepped * c.base + 4 * c.adapter),
    )


def plan_states(shape: ModelShape, ch: Choices, distributed: str, b: int, world: int) -> tuple[int, int, int, int]:
    states = OPTIMIZER_STATES[ch.optimizer]
    weights, grads, master, optimizer = state_bytes(shape.model, b, ch.master_weights, states)
    if distributed == "ddp":
        return weights, grads, master, optimizer
    root_w, root_g, *_ = state_bytes(shape.root, b, ch.master_weights, states)
    layer_w, layer_g, *_ = state_bytes(shape.layer, b, ch.master_weights, states)
    share = lambda n: math.ceil(n / world)  # noqa: E731
    return (share(weights) + root_w + 2 * layer_w, share(grads) + root_g + layer_g, share(master), share(optimizer))


def attention_path(attn: str, checkpointing: bool) -> str:
    """The pair engine's path for training.attn (engine/groups.py); "refused" for cache under checkpointing."""
    if attn == "cache":
        return "refused" if checkpointing else "cache"
    return "tree" if attn == "tree" or checkpointing else "cache"


def plans(shape: ModelShape, ch: Choices, world: int, workload) -> list[tuple[Plan, Workload | None]]:
    """Every combination ddp / fsdp x float32 / bfloat16 x checkpointing off / on, with its micro-batch
    (workload(path) -> Workload; None where the engine refuses the combination)."""
    rows = []
    for distributed in ("ddp", "fsdp"):
        for dtype in ("float32", "bfloat16"):
            for ckpt in (False, True):
                b = BYTES[dtype]
                path = attention_path(ch.attn, ckpt) if ch.attn else ""
                work = None if path == "refused" else workload(path)
                acts = 0 if work is None else activation_bytes(shape, work, b, ckpt)
                plan = Plan(distributed, dtype, ckpt, path, *plan_states(shape, ch, distributed, b, world), acts)
                rows.append((plan, work))
    return rows


def format_table(rows: list[Plan], ch: Choices, gpu_gib: float) -> str:
    """One line per plan; * marks the config's own (distributed, model_dtype, gradient_checkpointing)."""
    head = (
        f"  {'strategy':8} {'weights':8} {'ckpt':4} {'attn':7} {'weights':>8} {'grads':>8} {'master':>8} "
        f"{'optim':>8} {'activ':>8} {'total':>8}  fits {gpu_gib:g} GiB"
    )
    lines = [head, "  " + "-" * (len(head) - 2)]
    for r in rows:
        chosen = (r.distributed, r.model_dtype, r.checkpointing) == (
            ch.distributed,
            ch.model_dtype,
            ch.gradient_checkpointing,
        )
        gib = [f"{v / GIB:8.2f}" for v in (r.weights, r.grads, r.master, r.optimizer, r.activations, r.total)]
        fits = "refused by the engine" if r.path == "refused" else ("yes" if r.total <= gpu_gib * GIB else "NO")
        lines.append(
            f"{'*' if chosen else ' '} {r.distributed:8} {r.model_dtype:8} {'on' if r.checkpointing else 'off':4} "
            f"{r.path or '-':7} {' '.join(gib)}  {fits}"
        )
    return "\n".join(lines)


def _describe(shape: ModelShape, ch: Choices, world: int) -> list[str]:
    m = shape.model
    trainable = f"{m.base + m.adapter:,}" + (f" (LoRA r={shape.lora_r})" if shape.lora_r else " (full fine-tune)")
    return [
        f"model {shape.name}: {m.total:,} parameters, {trainable} trainable; {shape.layers} decoder layers of "
        f"{shape.layer.total:,}, root (embeddings, final norm, head) {shape.root.total:,}",
        f"world size {world}; optimizer {ch.optimizer}; master_weights {ch.master_weights} (bfloat16 rows)",
    ]


def _table(title: str, shape, ch: Choices, world: int, gpu_gib: float, workload) -> str:
    rows = plans(shape, ch, world, workload)
    notes = dict.fromkeys(work.note for _, work in rows if work is not None)
    return "\n".join([title, *_describe(shape, ch, world), *notes, format_table([p for p, _ in rows], ch, gpu_gib)])


SELF_ALIGN_SECTIONS = {"engraving": lambda c: c.engraving, "verbose": lambda c: c.verbose.training}


def _recipe_classes():
    from .sami.config import SAMIConfig
    from .self_align.config import SelfAlignConfig

    return SAMIConfig, SelfAlignConfig


def load_any(path, overrides=()):
    """A SAMI or SELF-ALIGN config: SELF-ALIGN when the file holds a key only SELF-ALIGN has."""
    sami, self_align = _recipe_classes()
    try:
        raw = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as error:
        raise ValueError(f"--config: cannot read {path}: {error}") from None
    only = {f.name for f in dataclasses.fields(self_align)} - {f.name for f in dataclasses.fields(sami)}
    cls = self_align if isinstance(raw, dict) and only & set(raw) else sami
    return load_config(cls, path, overrides)


def plan_report(config, *, world_size: int, gpu_memory_gb: float, prompt_tokens=None, response_tokens=None) -> str:
    """The plan's text for a loaded SAMIConfig or SelfAlignConfig."""
    for key, value in (("--world-size", world_size), ("--gpu-memory-gb", gpu_memory_gb)):
        if value <= 0:
            raise ValueError(f"{key}: expected a positive number, got {value}")
    sami, _ = _recipe_classes()
    header = "per-rank memory in GiB; * marks the config's choice; the formulas: sami_kernels/recipes/plan.py"
    if isinstance(config, sami):
        ch = choices(config, config.training)
        P = prompt_tokens if prompt_tokens is not None else DEFAULT_PROMPT_TOKENS
        R = response_tokens if response_tokens is not None else config.generation.max_new_tokens
        if P < 1 or R < 1:
            raise ValueError(f"--prompt-tokens and --response-tokens: expected positive numbers, got {P} and {R}")
        B, N = config.training.micro_batch_queries, config.constitutions.n
        shape = model_shape(config.model, ch.lora)
        title = f"SAMI micro-batch per rank: B={B} queries x N={N} constitutions, prompts P={P}, responses R={R}"
        work = functools.partial(pair_workload, B, N, P, R)
        return "\n".join([header, _table(title, shape, ch, world_size, gpu_memory_gb, work)])
    tables = [header]
    for name, section_of in SELF_ALIGN_SECTIONS.items():
        section = section_of(config)
        ch = choices(config, section)
        shape = model_shape(config.model, ch.lora)
        title = f"SELF-ALIGN SFT ({name}): packed rows of {section.pack_tokens} tokens"
        work = packed_workload(section.pack_tokens)
        tables.append(_table(title, shape, ch, world_size, gpu_memory_gb, lambda path, w=work: w))
    return "\n\n".join(tables)


def run_plan(config_path, overrides=(), **options) -> str:
    return plan_report(load_any(config_path, overrides), **options)
