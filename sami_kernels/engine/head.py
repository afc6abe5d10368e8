"""A causal LM's final hidden states through its own output head, by the fused kernels: the one place the engine
turns hidden states into log-probs (grouped completions, pair engine, packed scoring)."""

from __future__ import annotations

import torch

from ..kernels.ops.linear_logprobs import linear_logprobs
from ..kernels.ops.sequence import sequence_logprobs


def decoder_and_head(model):
    """(decoder returning final hidden states, output head) of a causal LM, peft-wrapped or not."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    decoder = getattr(base, base.base_model_prefix, None)
    head = base.get_output_embeddings()
    if decoder is None or head is None:
        raise ValueError(f"{type(base).__name__} is not a causal LM with a base model and an output head")
    config = base.config
    if getattr(config, "final_logit_softcapping", None):
        raise ValueError(
            f"{type(base).__name__} soft-caps its logits (final_logit_softcapping); the fused "
            "log-prob kernels compute plain log-softmax and would be wrong"
        )
    temperature = 1.0 / float(getattr(config, "logit_scale", None) or 1.0)
    return decoder, head, temperature


def head_sequence_logprobs(head, temperature, hidden, targets, seq_ids, num_seqs, *, reduction, backend="auto"):
    """sequence_logprobs of final hidden states [T, H] through a causal LM's output head (bias and logit scale
    honoured): what every caller here does with the states decoder_and_head's decoder returns."""
    return sequence_logprobs(
        hidden.to(head.weight.dtype),
        head.weight,
        targets,
        seq_ids,
        num_seqs,
        reduction=reduction,
        bias=getattr(head, "bias", None),
        temperature=temperature,
        backend=backend,
    )


def head_token_logprobs(head, temperature, hidden, targets, *, backend="auto"):
    """linear_logprobs of final hidden states [T, H] through a causal LM's output head: per-token log p(target) [T]."""
    bias = getattr(head, "bias", None)
    return linear_logprobs(
        hidden.to(head.weight.dtype), head.weight, targets, bias=bias, temperature=temperature, backend=backend
    )


# Per-token statistics of the next-token distribution p = softmax(z), z = head(h) / temperature, as TRL's fused LM
# head defines them: entropy -sum p log p; mean_logits mean_v z_v; is_top1 1.0 when the target is the first argmax;
# log_sum_sq_probs log sum_v p_v^2.
TOKEN_STATS = ("entropy", "mean_logits", "is_top1", "log_sum_sq_probs")


@torch.no_grad()
def head_token_stats(head, temperature, hidden, targets, names, *, chunk_bytes: int = 32 << 20) -> dict:
    """{name: float32 [T]} for each name in names (TOKEN_STATS) of hidden [T, H] and targets [T], without gradient,
    the [rows, V] logits formed chunk by chunk (at most chunk_bytes of float32 at a time)."""
    if not names:
        return {}
    weight, bias = head.weight, getattr(head, "bias", None)
    rows = max(1, chunk_bytes // (4 * weight.shape[0]))
    out = {name: [] for name in names}
    for start in range(0, hidden.shape[0], rows):
        z = hidden[start : start + rows].to(weight.dtype) @ weight.T
        z = ((z + bias) if bias is not None else z).float() / temperature
        logp = torch.log_softmax(z, dim=-1)
        for name in names:
            out[name].append(_token_stat(name, z, logp, targets[start : start + rows]))
    return {name: torch.cat(parts) for name, parts in out.items()}


def _token_stat(name: str, z: torch.Tensor, logp: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    if name == "entropy":
        return -(logp.exp() * logp).sum(-1)
    if name == "mean_logits":
        return z.mean(-1)
    if name == "is_top1":
        return (z.argmax(-1) == target).float()
    return torch.logsumexp(2 * logp, dim=-1)  # log_sum_sq_probs
