"""Shared-prompt log-probs inside TRL 1.16's GRPOTrainer and DPOTrainer: each prompt runs through the decoder once,
however many completions of it are in the batch.

    trainer = SharedPromptGRPOTrainer(model=model, reward_funcs=..., args=GRPOConfig(...), train_dataset=...)
    trainer.train()

Why the fused forward is the patch point. TRL 1.16 computes every policy and reference log-prob with one call,
model(input_ids, attention_mask, labels=labels, fused_lm_head=True), the forward that
trl.trainer.utils.add_fused_lm_head installs on the model (on the base model under PEFT): in
GRPOTrainer._get_per_token_logps_and_entropies (the policy in _compute_loss, the old and reference log-probs in
_generate_and_score_completions) and in DPOTrainer._compute_loss (policy and reference) and
DPOTrainer.compute_ref_log_probs (precomputed reference). Replacing that one forward leaves TRL's losses, masks,
normalisers and metrics as they are; only how the log-probs are computed changes.

What the replacement computes. Row r of a batch is [padding | prompt | completion | padding]: its attended tokens
(attention_mask, contiguous) and its labels, labels[r, c] = input_ids[r, c] on the scored completion tokens and -100
elsewhere. The completion runs from the first to the last labelled column; the prompt is the attended tokens before
it. Rows with identical prompts (GRPO: the G completions of a prompt; DPO: chosen and rejected) form one group, and
engine.groups.group_logprobs scores all groups in one call, each prompt through the decoder once. The result is TRL's
FusedCausalLMOutput with TRL's shapes, c = 1 .. L-1 indexing the next-token label:

    log_probs[r, c-1] = log softmax(logit_scale * head(h_{r,c-1}) / temperature)[input_ids[r, c]]  (0 where
                        labels[r, c] = -100)
    entropy, mean_logits, is_top1, log_sum_sq_probs: those of the same distribution, for the fields the trainer asked
                        add_fused_lm_head for (read from that forward), without gradient (TRL's entropy has one)
    label_mask = labels[:, 1:] != -100;  loss = -log_probs.sum() / (num_items_in_batch or label_mask.sum())

A batch without any label goes to TRL's own forward, which keeps its all-zero output connected to the model.
Without fused_lm_head=True, TRL's forward runs as before (generation is unchanged).

Positions. Each prompt starts at position 0 here. TRL's forward gives a left-padded row (GRPO) the column index as
positions, transformers' default. Rotary models (Llama, Qwen, Mistral, ...) see only position differences, so the two
agree to float rounding; models with absolute position embeddings (GPT-2) get positions shifted by the padding from
TRL and unshifted ones from here, so left-padded rows differ. DPO's rows are right-padded: no difference.

How much is shared. A forward sees only the rows TRL passes it. GRPO computes the old and reference log-probs in
chunks of per_device_train_batch_size rows of the generation batch, a prompt's G rows adjacent; the policy's after
shuffling the generation batch and splitting it into steps_per_generation parts, so there a prompt's completions share
one pass only where they land in the same part (all of them with steps_per_generation=1 and per_device_train_batch_size
a multiple of G).

Refused, each with a ValueError naming the option (share_prompts, and in the forward for what arrives per call):
GRPO's entropy bonus (entropy_coef != 0, use_adaptive_entropy: the entropy here has no gradient), vision inputs (a
processor as processing_class, a vision-language model, pixel_values and any forward input other than input_ids,
attention_mask, labels, num_items_in_batch, use_cache), MoE router logits (output_router_logits,
router_aux_loss_coef), cast_lm_head_to_fp32, logit soft-capping and logit scalings other than config.logit_scale,
context, sequence and tensor parallelism (shift_labels, parallelism_config), FSDP and DeepSpeed ZeRO-3 (sharded
head), prompt-learning PEFT (virtual tokens), padding_free, rows whose attended tokens are not contiguous, labels on
padding or that differ from input_ids, and a label on a row's first attended token (TRL scores it from a padding
position's state). Trainers other than GRPOTrainer and DPOTrainer (RLOO, KTO, ...) are refused: not checked here.
"""

from __future__ import annotations

import functools
import inspect
import types

import torch
from peft import PeftModel
from transformers import ProcessorMixin
from trl import DPOTrainer, GRPOTrainer
from trl.trainer.utils import FusedCausalLMOutput

from ..engine.groups import group_logprobs
from ..engine.head import TOKEN_STATS

# What TRL's trainers pass the fused forward; any other input (pixel_values, token_type_ids, position_ids,
# inputs_embeds, shift_labels, output_router_logits, ...) is refused when it is not None.
FORWARD_INPUTS = ("input_ids", "attention_mask", "labels", "num_items_in_batch", "use_cache")
# What add_fused_lm_head fixes when it patches the forward, read from the closure of the forward it installs.
FUSED_HEAD_SETTINGS = ("temperature", "outputs", "cast_lm_head_to_fp32", "final_logit_softcapping", "logit_scale")


def fused_head_settings(model) -> dict:
    """{temperature, outputs, cast_lm_head_to_fp32, final_logit_softcapping, logit_scale} as TRL's add_fused_lm_head
    fixed them for model (they live in the closure of the forward it installs)."""
    forward = model.forward
    closure = inspect.getclosurevars(forward).nonlocals if inspect.ismethod(forward) else {}
    missing = [name for name in FUSED_HEAD_SETTINGS if name not in closure]
    if missing:
        raise ValueError(
            f"{type(model).__name__}.forward is not the one trl.trainer.utils.add_fused_lm_head (trl 1.16) installs "
            f"(its closure lacks {', '.join(missing)}): patch the model with add_fused_lm_head first"
        )
    return {name: closure[name] for name in FUSED_HEAD_SETTINGS}


def share_prompts_in_forward(model, *, attn: str = "auto", backend: str = "auto") -> None:
    """Replace the forward TRL's add_fused_lm_head installed on model (module docstring): with fused_lm_head=True,
    rows with identical prompts are scored by one group_logprobs call (attn, backend: its options); otherwise TRL's
    forward runs. Applying it twice is a no-op."""
    if getattr(model.forward, "shares_prompts", False):
        return
    settings = fused_head_settings(model)
    _check_head(model, settings)
    fused_forward = model.forward
    stats = tuple(name for name in settings["outputs"] if name in TOKEN_STATS)
    temperature = settings["temperature"]

    @functools.wraps(type(model).forward)  # generate() validates its keyword arguments against this signature
    def forward(self, *args, fused_lm_head=False, **kwargs):
        if not fused_lm_head:
            return fused_forward(*args, **kwargs)
        if args:
            raise ValueError("the shared-prompt forward takes keyword arguments only (input_ids=..., labels=...)")
        unsupported = sorted(k for k, v in kwargs.items() if k not in FORWARD_INPUTS and v is not None)
        if unsupported:
            raise ValueError(
                f"the shared-prompt forward takes {', '.join(FORWARD_INPUTS)}; it got {', '.join(unsupported)} "
                "(vision inputs, router logits, shift_labels and position_ids are not supported)"
            )
        rows = PromptGroups.from_batch(kwargs["input_ids"], kwargs.get("attention_mask"), kwargs["labels"])
        if not rows.prompts:
            return fused_forward(fused_lm_head=True, **kwargs)
        scored = group_logprobs(
            self, rows.prompts, rows.completions, temperature=temperature, stats=stats, attn=attn, backend=backend
        )
        fields = {"log_probs": rows.to_label_positions(scored.tokens)}
        for name, values in scored.stats.items():
            fields[name] = rows.to_label_positions(values)
        if "is_top1" in fields:
            fields["is_top1"] = fields["is_top1"].bool()
        num_items = kwargs.get("num_items_in_batch")
        denominator = rows.label_mask.sum().clamp(min=1) if num_items is None else num_items
        return FusedCausalLMOutput(loss=-fields["log_probs"].sum() / denominator, label_mask=rows.label_mask, **fields)

    forward.shares_prompts = True
    model.forward = types.MethodType(forward, model)


def _check_head(model, settings: dict) -> None:
    """Refuse what add_fused_lm_head computes and group_logprobs does not: fp32 head, soft-capping, a logit scaling
    other than config.logit_scale, vision-language models and MoE router logits."""
    name = type(model).__name__
    config = model.config
    if settings["cast_lm_head_to_fp32"]:
        raise ValueError(f"cast_lm_head_to_fp32=True is not supported: {name}'s head runs in its own dtype here")
    if settings["final_logit_softcapping"] is not None:
        raise ValueError(f"{name} soft-caps its logits (final_logit_softcapping), which the fused kernels do not")
    engine_scale = float(getattr(config, "logit_scale", None) or 1.0)
    if settings["logit_scale"] != engine_scale:
        raise ValueError(
            f"{name} scales its logits by {settings['logit_scale']} (logit_scale, output_multiplier, "
            f"lm_head_multiplier or logits_scaling); sami_kernels honours config.logit_scale only ({engine_scale})"
        )
    if config.get_text_config() is not config:
        raise ValueError(f"{name} is a vision-language model: vision inputs are not supported")
    if getattr(config, "output_router_logits", False):
        raise ValueError(f"{name} has output_router_logits=True (MoE router logits and aux loss): not supported")


class PromptGroups:
    """A TRL batch split into prompts and completions, rows with identical prompts grouped (module docstring).

    prompts[g], completions[g]: group_logprobs' inputs; row_of [batch]: the group_logprobs row of each batch row (0
    for rows without labels, whose outputs stay 0); start [batch]: the label position (column - 1) of each row's first
    completion token; label_mask [batch, seq_len - 1]: labels[:, 1:] != -100."""

    def __init__(self, prompts, completions, row_of, start, label_mask):
        self.prompts, self.completions = prompts, completions
        self.row_of, self.start, self.label_mask = row_of, start, label_mask

    @classmethod
    def from_batch(cls, input_ids, attention_mask, labels) -> PromptGroups:
        """Split and group a batch: input_ids, attention_mask (None: all attended), labels [batch, seq_len]."""
        batch, length = input_ids.shape
        label_mask = labels[:, 1:] != -100
        ids, labels = input_ids.cpu(), labels.cpu()
        attended = torch.ones_like(ids, dtype=torch.bool) if attention_mask is None else attention_mask.cpu().bool()
        labelled = torch.zeros_like(attended)
        labelled[:, 1:] = label_mask.cpu()  # the label of column 0 is predicted by nothing: TRL drops it too
        columns = torch.arange(length)
        first_attended = torch.where(attended, columns, length).amin(1)
        last_attended = torch.where(attended, columns, -1).amax(1)
        first_label = torch.where(labelled, columns, length).amin(1)
        last_label = torch.where(labelled, columns, -1).amax(1)
        _check_rows(ids, labels, attended, labelled, first_attended, last_attended, first_label)

        groups: dict[tuple[int, ...], int] = {}
        prompts, completions, members = [], [], []
        for r in labelled.any(1).nonzero()[:, 0].tolist():
            prompt = ids[r, first_attended[r] : first_label[r]].tolist()
            g = groups.setdefault(tuple(prompt), len(groups))
            if g == len(prompts):
                prompts.append(prompt)
                completions.append([])
            members.append((r, g, len(completions[g])))
            completions[g].append(ids[r, first_label[r] : last_label[r] + 1].tolist())
        offsets = [0]
        for group in completions:
            offsets.append(offsets[-1] + len(group))
        row_of = torch.zeros(batch, dtype=torch.long)
        for r, g, j in members:
            row_of[r] = offsets[g] + j
        device = input_ids.device
        return cls(prompts, completions, row_of.to(device), (first_label - 1).to(device), label_mask)

    def to_label_positions(self, values: torch.Tensor) -> torch.Tensor:
        """Per completion token [rows, C] -> per label position [batch, seq_len - 1], 0 where the label is -100."""
        positions = torch.arange(self.label_mask.shape[1], device=values.device)
        index = (positions[None, :] - self.start[:, None]).clamp(0, values.shape[1] - 1)
        return values[self.row_of].gather(1, index).masked_fill(~self.label_mask, 0)


def _check_rows(ids, labels, attended, labelled, first_attended, last_attended, first_label) -> None:
    """Refuse rows the prompt/completion split cannot reproduce TRL's output for (module docstring)."""
    scored = labelled.any(1)
    problems = {
        "its attended tokens are not contiguous (packed or padding-free input)": scored
        & (attended.sum(1) != last_attended - first_attended + 1),
        "a label falls on a padding token": (labelled & ~attended).any(1),
        "a label differs from its input id": (labelled & (labels != ids)).any(1),
        "its first attended token has a label (no prompt; TRL scores it from a padding position)": scored
        & (first_label <= first_attended),
    }
    for problem, rows in problems.items():
        if rows.any():
            raise ValueError(f"batch row {int(rows.nonzero()[0, 0])}: {problem}; the shared-prompt forward refuses it")


def share_prompts(trainer, *, attn: str = "auto", backend: str = "auto") -> None:
    """Check trainer's options, then share_prompts_in_forward on its policy (the base model under PEFT) and its
    reference model. attn, backend: group_logprobs' options. Applying it twice is a no-op."""
    if not isinstance(trainer, GRPOTrainer | DPOTrainer):
        raise ValueError(f"share_prompts supports GRPOTrainer and DPOTrainer, not {type(trainer).__name__}")
    _check_trainer(trainer)
    unwrap = trainer.accelerator.unwrap_model
    policy = unwrap(trainer.model)
    share_prompts_in_forward(
        policy.get_base_model() if isinstance(policy, PeftModel) else policy, attn=attn, backend=backend
    )
    if trainer.ref_model is not None:
        share_prompts_in_forward(unwrap(trainer.ref_model), attn=attn, backend=backend)


def _check_trainer(trainer) -> None:
    """Refuse the trainer options the shared-prompt forward does not support (module docstring)."""
    args = trainer.args
    if getattr(args, "entropy_coef", 0.0) != 0.0:
        raise ValueError("entropy_coef != 0 is not supported: the entropy of the shared-prompt forward has no gradient")
    if getattr(args, "use_adaptive_entropy", False):
        raise ValueError("use_adaptive_entropy=True is not supported: the shared-prompt entropy has no gradient")
    if isinstance(trainer.processing_class, ProcessorMixin):
        raise ValueError("a processor as processing_class (vision inputs) is not supported: pass a tokenizer")
    if getattr(trainer, "aux_loss_enabled", False):
        raise ValueError("router_aux_loss_coef != 0 (MoE router logits and aux loss) is not supported")
    if getattr(args, "cast_lm_head_to_fp32", False):
        raise ValueError("cast_lm_head_to_fp32=True is not supported")
    if getattr(trainer, "padding_free", False):
        raise ValueError("padding_free=True is not supported: rows must be padded, one sequence each")
    parallelism = trainer.accelerator.parallelism_config
    for size in ("cp_size", "sp_size", "tp_size"):
        if getattr(parallelism, size, 1) > 1:
            raise ValueError(f"parallelism_config.{size} > 1 is not supported: each row must hold a whole sequence")
    if trainer.is_fsdp_enabled:
        raise ValueError("FSDP is not supported (the output head is sharded)")
    if trainer.is_deepspeed_enabled and trainer.accelerator.state.deepspeed_plugin.zero_stage == 3:
        raise ValueError("DeepSpeed ZeRO-3 is not supported (the output head is sharded)")
    policy = trainer.accelerator.unwrap_model(trainer.model)
    if isinstance(policy, PeftModel) and policy.active_peft_config.is_prompt_learning:
        raise ValueError(
            f"prompt-learning PEFT ({policy.active_peft_config.peft_type}) is not supported: its virtual tokens "
            "are not in input_ids"
        )


class SharedPromptGRPOTrainer(GRPOTrainer):
    """GRPOTrainer whose policy, old and reference log-probs share each prompt's decoder pass (share_prompts)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        share_prompts(self)


class SharedPromptDPOTrainer(DPOTrainer):
    """DPOTrainer whose policy and reference log-probs share each prompt's decoder pass between chosen and rejected
    (share_prompts), precomputed reference log-probs included."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        share_prompts(self)

    def _precompute_ref_logps(self, *args, **kwargs):
        share_prompts(self)  # DPOTrainer.__init__ precomputes with precompute_ref_log_probs=True, before it returns
        return super()._precompute_ref_logps(*args, **kwargs)
