"""A causal LM's final hidden states through its own output head, by the fused kernels: the one place the engine
turns hidden states into log-probs (pair engine, packed scoring)."""

from __future__ import annotations

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
