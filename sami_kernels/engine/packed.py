"""Packed-sequence scoring: many (prompt, continuation) sequences packed back to back into rows with no padding,
one decoder pass per row, position ids restarting at each sequence (transformers then builds a block-diagonal causal
mask, and flash-attn runs varlen), so no token sees another sequence. Only the hidden states that predict
continuation tokens reach the output head, through the fused kernels.

    packed_logprobs(model, row)[k] = sum over continuation tokens t of sequence k of log p(t | earlier tokens of k)

A (prompt, continuation) pair is tokenised by the rule of engine/tokens.py: ids = encode(prompt + continuation), the
scored tokens are its tail after encode(prompt) (an SFT answer after "\n" keeps the tokens it has in context, with no
spurious leading "▁" on SentencePiece tokenizers); a token merging across the boundary is refused (ValueError).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .head import decoder_and_head, head_sequence_logprobs
from .tokens import split_continuation


@dataclass
class Sequence:
    ids: list[int]  # encode(prompt + response)
    first_target: int  # index of the first response token in ids


def tokenize_pair(tokenizer, prompt: str, response: str, cutoff: int) -> Sequence | None:
    """encode(prompt + response) cut at `cutoff` tokens, scored after encode(prompt); None when no response token
    survives the cut. BoundaryMergeError when a token merges across the prompt/response boundary."""
    prompt_ids, response_ids = split_continuation(tokenizer, prompt, response)
    ids = (prompt_ids + response_ids)[:cutoff]
    return Sequence(ids, len(prompt_ids)) if len(ids) > len(prompt_ids) else None


def pack(sequences: list[Sequence], pack_tokens: int) -> list[list[Sequence]]:
    """Consecutive sequences grouped into rows of at most pack_tokens tokens (order kept, so resumes are exact)."""
    rows, row, used = [], [], 0
    for seq in sequences:
        if len(seq.ids) > pack_tokens:
            raise ValueError(f"a sequence of {len(seq.ids)} tokens exceeds pack_tokens = {pack_tokens}")
        if used + len(seq.ids) > pack_tokens:
            rows.append(row)
            row, used = [], 0
        row.append(seq)
        used += len(seq.ids)
    return rows + ([row] if row else [])


def packed_logprobs(model, row: list[Sequence], *, backend: str = "auto") -> torch.Tensor:
    """[len(row)] float32: sum of log p(response tokens | their own sequence's earlier tokens), per sequence of a
    packed row, from one decoder pass over the row."""
    decoder, head, temperature = decoder_and_head(model)
    device = next(model.parameters()).device
    ids = torch.tensor([t for s in row for t in s.ids], device=device)[None]
    positions = torch.cat([torch.arange(len(s.ids), device=device) for s in row])[None]
    hidden = decoder(input_ids=ids, position_ids=positions, use_cache=False).last_hidden_state[0]
    predicting, owner, offset = [], [], 0  # the state at p predicts token p + 1 of the same sequence
    for k, s in enumerate(row):
        predicting.extend(range(offset + s.first_target - 1, offset + len(s.ids) - 1))
        owner.extend([k] * (len(s.ids) - s.first_target))
        offset += len(s.ids)
    where = torch.tensor(predicting, device=device)
    return head_sequence_logprobs(
        head,
        temperature,
        hidden[where],
        ids[0, where + 1],
        torch.tensor(owner, device=device),
        len(row),
        reduction="sum",
        backend=backend,
    )


@torch.no_grad()
def continuation_logprobs(model, tokenizer, prompts: list[str], continuations: list[str], *, pack_tokens=1024):
    """[sum of log p(continuation_k | prompt_k)] for each k."""
    was_training = model.training
    model.eval()
    sequences = [
        tokenize_pair(tokenizer, p, c, cutoff=pack_tokens) for p, c in zip(prompts, continuations, strict=True)
    ]
    if any(s is None for s in sequences):
        raise ValueError(f"a prompt is longer than pack_tokens = {pack_tokens}")
    scores = [v for row in pack(sequences, pack_tokens) for v in packed_logprobs(model, row).tolist()]
    model.train(was_training)
    return scores
