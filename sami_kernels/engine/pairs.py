"""Pair engine: SAMI's matrix M[b, i, j] = mean log p(response_j | prompt(c_i, x_b)) from any Hugging Face causal
LM, with every prefix prompt(c_i, x_b) encoded once.

Per query, N prompts of P tokens and N responses of R tokens: the naive computation runs N^2 sequences of P + R
tokens; prefix sharing runs N P + N^2 R, exactly: M is group_logprobs (groups.py) of the B N prompts, each with the
same N responses as its completions, reduced per pair. Only the final hidden states that predict response tokens go
to the fused kernels with the model's own output head.

Tokenisation (PairBatch.from_texts, the rule of engine/tokens.py): prompt_i's ids are encode(prompt_i) and response
j's ids under constitution i are the tail of encode(prompt_i + response_j) after them, so the response is scored with
the tokens it has in its context. A token merging across the boundary is refused (BoundaryMergeError). The engine
scores one token sequence per response under every constitution, so tails that differ between constitutions are
refused too, unless joint_tokenization=True, where each pair (i, j) keeps its own tail.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..kernels.ops.infonce import infonce_loss
from .groups import check_lengths, group_logprobs
from .tokens import BoundaryMergeError, encode, tail_after

DEFAULT_TEMPLATE = "System: {constitution}\n\nHuman: {query}\n\nAssistant:"


@dataclass
class PairBatch:
    """Token ids of B queries x N constitutions x N responses, exactly as scored.

    prompt_ids[b][i]:   encode(prompt_i), the prompt under constitution i (BOS once, see the module docstring)
    response_ids[b][j]: the tokens of response j that are scored (no EOS), taken under constitution j
    pair_ids[b][i][j]:  tokens scored for the pair (i, j); equal to response_ids[b][j] unless the batch was built
                        with joint_tokenization=True (the reference code's way: each pair keeps its own tail, so
                        the response's tokens may differ per constitution)
    """

    prompt_ids: list[list[list[int]]]
    response_ids: list[list[list[int]]]
    pair_ids: list[list[list[list[int]]]]

    @property
    def num_queries(self) -> int:
        return len(self.prompt_ids)

    @property
    def num_constitutions(self) -> int:
        return len(self.prompt_ids[0])

    @classmethod
    def from_texts(
        cls,
        tokenizer,
        queries,
        constitutions,
        responses,
        *,
        template: str = DEFAULT_TEMPLATE,
        joint_tokenization: bool = False,
    ) -> PairBatch:
        """queries [B] str; constitutions [N] str (shared) or [B][N]; responses [B][N] (response j written under
        constitution j). Prompts are template.format(constitution=..., query=...); no EOS target."""
        B = len(queries)
        if B == 0:
            raise ValueError("queries is empty")
        if constitutions and isinstance(constitutions[0], str):
            constitutions = [list(constitutions)] * B
        if len(constitutions) != B or len(responses) != B:
            raise ValueError(
                f"need constitutions and responses for each of the {B} queries, got "
                f"{len(constitutions)} and {len(responses)}"
            )
        N = len(constitutions[0])
        if N < 2:
            raise ValueError(f"SAMI contrasts N >= 2 constitutions per query, got {N}")
        prompt_ids, response_ids, pair_ids = [], [], []
        for b, replies in enumerate(responses):
            if len(constitutions[b]) != N or len(replies) != N:
                raise ValueError(
                    f"query {b}: expected {N} constitutions and {N} responses, got "
                    f"{len(constitutions[b])} and {len(replies)}"
                )
            prompts = [template.format(constitution=c, query=queries[b]) for c in constitutions[b]]
            prompt_ids.append([encode(tokenizer, p) for p in prompts])
            if not all(prompt_ids[b]):
                raise ValueError(f"query {b}: a prompt is empty after tokenisation (and the tokenizer has no BOS)")
            pairs = [
                [
                    _response_tail(tokenizer, prompt_ids[b][i], prompt + text, (b, i, j))
                    for j, text in enumerate(replies)
                ]
                for i, prompt in enumerate(prompts)
            ]
            response_ids.append([pairs[j][j] for j in range(N)])  # under the constitution it was written for
            if not joint_tokenization:
                _check_same_tails(pairs, b)
                pairs = [response_ids[b]] * N
            pair_ids.append(pairs)
        return cls(prompt_ids, response_ids, pair_ids)


def _response_tail(tokenizer, prompt_ids: list[int], text: str, where: tuple[int, int, int]) -> list[int]:
    """The ids of encode(text = prompt + response) after encode(prompt): the response's tokens in their context."""
    b, i, j = where
    tail = tail_after(prompt_ids, encode(tokenizer, text))
    if tail is None:
        raise BoundaryMergeError(
            f"query {b}, constitution {i}, response {j}: a token merges across the prompt/response boundary "
            "(encode(prompt) is not a token prefix of encode(prompt + response)); end the template or start the "
            "response differently"
        )
    if not tail:
        raise ValueError(f"query {b}, response {j} is empty after tokenisation (under constitution {i})")
    return tail


def _check_same_tails(pairs: list[list[list[int]]], b: int) -> None:
    """Without joint tokenisation, response j must have one token sequence under every constitution."""
    for i, row in enumerate(pairs):
        for j, tail in enumerate(row):
            if tail != pairs[0][j]:
                raise BoundaryMergeError(
                    f"query {b}, response {j}: its tokens after the prompt differ between constitution 0 and "
                    f"constitution {i} (the prompt's end changes how the response tokenises); pass "
                    "joint_tokenization=True to score each pair's own tokens"
                )


def _check_lengths(batch: PairBatch, model) -> None:
    N = batch.num_constitutions
    prompts, completions = _pair_groups(batch)
    check_lengths(model, prompts, completions, lambda r, j: f"query {r // N}, constitution {r % N}, response {j}")


def _pair_groups(batch: PairBatch) -> tuple[list[list[int]], list[list[list[int]]]]:
    """(prompts: row b * N + i, completions: of prompt row b * N + i the N responses j) for group_logprobs."""
    prompts = [p for per_query in batch.prompt_ids for p in per_query]
    return prompts, [rows for per_query in batch.pair_ids for rows in per_query]


def _pair_rows(batch: PairBatch, device):
    """(prompts: row b * N + i, pairs: row (b * N + i) * N + j, owner: the prompt row of each pair row)."""
    prompts, completions = _pair_groups(batch)
    pairs = [pair for rows in completions for pair in rows]
    return prompts, pairs, torch.arange(len(prompts), device=device).repeat_interleave(batch.num_constitutions)


def pair_logprobs(
    model,
    batch: PairBatch,
    *,
    reduction: str = "mean",
    prefix_sharing: bool = True,
    attn: str = "auto",
    backend: str = "auto",
) -> torch.Tensor:
    """M [B, N, N] float32: sum or mean (SAMI: "mean") of log p(pair_ids[b][i][j] | prompt_ids[b][i]).

    Differentiable in the model's parameters. prefix_sharing=False runs the N^2 full sequences (same result).
    attn: "cache" (prefix pass + KV cache reused by index), "tree" (one packed pass per prompt with a tree mask;
    works under gradient checkpointing), "auto" (cache, or tree when gradient checkpointing is active); a
    combination with the model's attention implementation that cannot run is refused before any forward
    (groups.py, "Attention modes")."""
    if reduction not in ("sum", "mean"):
        raise ValueError(f"reduction must be 'sum' or 'mean', got {reduction!r}")
    _check_lengths(batch, model)
    prompts, completions = _pair_groups(batch)
    scored = group_logprobs(model, prompts, completions, attn=attn, prefix_sharing=prefix_sharing, backend=backend)
    per_pair = scored.means if reduction == "mean" else scored.sums
    return per_pair.view(batch.num_queries, batch.num_constitutions, batch.num_constitutions)


class PairScorer(torch.nn.Module):
    """pair_logprobs(model, batch, **options) as a module's forward, so that DistributedDataParallel (and FSDP) see
    the forward call they hook into: ddp = DistributedDataParallel(PairScorer(model)); M = ddp(batch).
    With step = keyword arguments of gradcache.cached_step (max_pairs_per_pass, direction, loss_scale), the forward
    is the gradient-caching step and returns its (remainder, loss, M): the backwards of all chunks but the last run
    inside the forward, and remainder.backward(), the caller's, is the one DDP synchronises."""

    def __init__(self, model, **options):
        super().__init__()
        self.model, self.options = model, options

    def forward(self, batch: PairBatch, step: dict | None = None):
        if step is None:
            return pair_logprobs(self.model, batch, **self.options)
        from torch.distributed.fsdp import FSDPModule

        from .gradcache import cached_step  # gradcache builds on this module

        if not isinstance(self, FSDPModule):
            return cached_step(self.model, batch, **self.options, **step)
        # FSDP2 unshards this root's own parameters (embeddings, norm, head) for its forward only; the chunk
        # backwards inside it would reshard them before the next chunk's forward needs them
        self.set_reshard_after_backward(False, recurse=False)
        try:
            return cached_step(self.model, batch, **self.options, **step)
        finally:
            self.set_reshard_after_backward(True, recurse=False)


def sami_step_loss(
    model,
    batch: PairBatch,
    *,
    direction: str = "both",
    prefix_sharing: bool = True,
    attn: str = "auto",
    backend: str = "auto",
    max_pairs_per_pass: int | None = None,
    loss_scale: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, M): SAMI's InfoNCE over the length-normalised pair matrix; what a trainer calls each step.

    max_pairs_per_pass=None: one pass; loss is differentiable, the caller runs its backward.
    max_pairs_per_pass=k: gradient caching over chunks of at most k pairs (engine/gradcache.py: activation memory of
    the prefixes and one chunk, whatever N^2). This mode runs the backward itself: loss and M come back detached and
    the gradients of loss_scale * loss are accumulated into .grad, as (loss_scale * loss).backward() would; for
    gradient accumulation pass each micro-batch's weight as loss_scale (e.g. its share of the step's queries).
    It runs the KV-cache path (attn 'auto' or 'cache', prefix_sharing=True), under gradient checkpointing too."""
    if max_pairs_per_pass is None:
        if loss_scale != 1.0:
            raise ValueError(
                "loss_scale is used with max_pairs_per_pass only; with one pass, scale the returned loss yourself"
            )
        M = pair_logprobs(model, batch, reduction="mean", prefix_sharing=prefix_sharing, attn=attn, backend=backend)
        return infonce_loss(M, direction=direction, backend=backend), M
    if not prefix_sharing:
        raise ValueError("max_pairs_per_pass chunks the shared-prefix pass: pass prefix_sharing=True")
    remainder, loss, M = PairScorer(model, attn=attn, backend=backend)(
        batch, step={"max_pairs_per_pass": max_pairs_per_pass, "direction": direction, "loss_scale": loss_scale}
    )
    remainder.backward()
    return loss, M
