"""Pair engine: SAMI's matrix M[b, i, j] = mean log p(response_j | prompt(c_i, x_b)) from any Hugging Face causal
LM, with every prefix prompt(c_i, x_b) encoded once.

Per query, N prompts of P tokens and N responses of R tokens: the naive computation runs N^2 sequences of P + R
tokens; prefix sharing runs N P + N^2 R, exactly:
    1. prefix pass: the B*N prompts, left-padded, through the decoder with use_cache=True;
    2. the cache rows are selected by index so that row (b, i, j) holds prefix (b, i) (autograd flows through it);
    3. response pass: the B*N*N responses, right-padded, attending to their prefix's cache, positions continuing
       the true prefix length;
    4. the final hidden states that predict response tokens (the last prefix state, then the response states)
       go to the fused kernels with the model's own output head: never full-vocabulary logits at every position.

Attention modes (resolve_attn; read from transformers 5.x: masking_utils, modeling_flash_attention_utils,
integrations/{sdpa,flex}_attention.py, the Llama attention). attn="cache" is the above: 2D padding masks and a KV
cache, which every implementation turns into its own mask (sdpa/eager: a 4D mask with the cache offset; flex: a
BlockMask; flash_attention_2: unpadding and flash_attn_varlen_func, whose bottom-right causal alignment lets each
response see its whole prefix). attn="tree" runs one packed pass per query with a 4D tree mask, which transformers
hands to the attention unchanged: sdpa takes it boolean; eager and flex_attention add it to the scores (flex as a
score_mod), so they get it additive (0 / dtype min); flash_attention_2 expects a 2D padding mask and is refused.
Under gradient checkpointing in training mode transformers drops the KV cache, so "cache" is refused there.
"auto" = "cache", or "tree" under checkpointing; with flash_attention_2 under checkpointing nothing runs and the
error says what to change (sdpa, checkpointing off, or prefix_sharing=False, which runs plain 2D-masked sequences).
Other implementations are refused. Tested exact here: eager and sdpa; flex_attention's forward through torch's
unfused flex reference (on the CPU torch cannot compile flex attention and has no flex backward).

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
from .head import decoder_and_head, head_sequence_logprobs
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
    limit = getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", None)
    if limit is None:
        return
    for b, (prompts, pairs) in enumerate(zip(batch.prompt_ids, batch.pair_ids, strict=True)):
        for i, prompt in enumerate(prompts):
            for j, ids in enumerate(pairs[i]):
                if len(prompt) + len(ids) > limit:
                    raise ValueError(
                        f"query {b}, constitution {i}, response {j}: {len(prompt) + len(ids)} tokens "
                        f"exceed the model's maximum of {limit}"
                    )


def _pad(rows: list[list[int]], *, left: bool, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, attention mask) of token rows padded with id 0 on the left or the right."""
    width = max(map(len, rows))
    ids = torch.zeros((len(rows), width), dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for r, row in enumerate(rows):
        span = slice(width - len(row), width) if left else slice(0, len(row))
        ids[r, span] = torch.tensor(row)
        mask[r, span] = 1
    return ids.to(device), mask.to(device)


def _stack(rows: list[list[int]], fill: int, device) -> torch.Tensor:
    """Integer rows right-padded with fill -> [len(rows), longest]."""
    out = torch.full((len(rows), max(map(len, rows))), fill, dtype=torch.long)
    for r, row in enumerate(rows):
        out[r, : len(row)] = torch.tensor(row)
    return out.to(device)


def _checkpointing(model) -> bool:
    return model.training and any(getattr(m, "gradient_checkpointing", False) for m in model.modules())


# The 4D mask each attention implementation applies as built (see "Attention modes" in the module docstring);
# flash_attention_2 takes only 2D padding masks, so it has no entry.
TREE_MASK_KIND = {"eager": "additive", "sdpa": "boolean", "flex_attention": "additive"}
ATTN_IMPLEMENTATIONS = ("eager", "sdpa", "flash_attention_2", "flex_attention")


def check_attn_implementation(model) -> str:
    """The model's attention implementation, refused unless the pair engine knows how it treats masks."""
    implementation = model.config._attn_implementation
    if implementation not in ATTN_IMPLEMENTATIONS:
        raise ValueError(
            f"the pair engine runs attention implementations {', '.join(ATTN_IMPLEMENTATIONS)}; the model uses "
            f"{implementation!r}: load it with attn_implementation='sdpa'"
        )
    return implementation


def resolve_attn(model, attn: str, prefix_sharing: bool = True) -> str:
    """The way pairs are run, "full" (prefix_sharing=False), "cache" or "tree", checked against the model's attention
    implementation and gradient checkpointing before any forward; a ValueError names what to change instead."""
    if attn not in ("auto", "cache", "tree"):
        raise ValueError(f"attn must be 'auto', 'cache' or 'tree', got {attn!r}")
    if not prefix_sharing:
        return "full"
    implementation = check_attn_implementation(model)
    checkpointing = _checkpointing(model)
    tree_ok = implementation in TREE_MASK_KIND
    if attn == "auto":
        if checkpointing and not tree_ok:
            raise ValueError(
                f"attn='auto' has no mode for {implementation} under gradient checkpointing in training mode: "
                "attn='cache' gets no KV cache there (transformers drops it) and attn='tree' needs a 4D mask, "
                f"which {implementation} does not take; load the model with attn_implementation='sdpa', turn "
                "gradient checkpointing off, or pass prefix_sharing=False"
            )
        return "tree" if checkpointing else "cache"
    if attn == "cache" and checkpointing:
        alternative = "attn='tree'" if tree_ok else "attn='tree' with attn_implementation='sdpa'"
        raise ValueError(
            "attn='cache' gets no KV cache under gradient checkpointing in training mode (transformers drops it): "
            f"use {alternative}, prefix_sharing=False, or turn gradient checkpointing off"
        )
    if attn == "tree" and not tree_ok:
        alternative = "" if checkpointing else " or attn='cache'"
        raise ValueError(
            f"attn='tree' needs an additive or boolean 4D attention mask; {implementation} takes only 2D padding "
            f"masks (transformers passes a 4D mask to it unchanged): use attn_implementation='sdpa'{alternative}"
        )
    return attn


def _prefix_pass(decoder, prompts, device):
    """The prompts, left-padded, through the decoder with use_cache=True -> (last hidden state of each prompt
    [rows, H], KV cache, attention mask [rows, P])."""
    p_ids, p_mask = _pad(prompts, left=True, device=device)
    prefix = decoder(
        input_ids=p_ids, attention_mask=p_mask, position_ids=(p_mask.cumsum(-1) - 1).clamp(min=0), use_cache=True
    )
    cache = prefix.past_key_values
    if cache is None or cache.get_seq_length() != p_ids.shape[1]:
        raise ValueError(
            "the prefix pass returned no KV cache (gradient checkpointing in training mode drops it); "
            "use attn='tree' or prefix_sharing=False"
        )
    return prefix.last_hidden_state[:, -1], cache, p_mask  # left padding: the last column is the last token


def _response_states(decoder, last_prefix, cache, p_mask, pairs, device):
    """The response pass of pair rows on top of their prefixes (last_prefix, cache and p_mask already hold row r's
    prefix in row r): (states predicting each response token [rows, R, H], the response ids [rows, R])."""
    r_ids, r_mask = _pad(pairs, left=False, device=device)
    r_pos = p_mask.sum(-1)[:, None] + torch.arange(r_ids.shape[1], device=device)
    response = decoder(
        input_ids=r_ids,
        attention_mask=torch.cat([p_mask, r_mask], dim=1),
        position_ids=r_pos,
        past_key_values=cache,
        use_cache=True,
    )
    return torch.cat([last_prefix[:, None], response.last_hidden_state[:, :-1]], dim=1), r_ids


def _prefix_cache_states(decoder, prompts, pairs, owner, device):
    """Prefix pass with use_cache, cache rows selected per pair, then the response pass on top of it."""
    last_prefix, cache, p_mask = _prefix_pass(decoder, prompts, device)
    cache.batch_select_indices(owner)  # row (b, i, j) <- prefix (b, i)
    return _response_states(decoder, last_prefix[owner], cache, p_mask[owner], pairs, device)


def _tree_states(decoder, batch: PairBatch, attn_implementation: str, device):
    """One packed pass per query: [prefix_0 .. prefix_N-1 | response (0,0) .. (N-1,N-1)] with a tree mask
    (position q sees position k <= q of its own prefix and of its own response only), positions restarting per
    branch. No cache, so it works under gradient checkpointing; dense attention over the packed length."""
    B, N = batch.num_queries, batch.num_constitutions
    rows, groups, branches, positions, spans = [], [], [], [], []
    for b in range(B):
        ids, group, branch, pos, where = [], [], [], [], {}
        for i, prompt in enumerate(batch.prompt_ids[b]):
            where[i] = len(ids) + len(prompt) - 1  # the state that predicts the first response token
            ids += prompt
            group += [i] * len(prompt)
            branch += [-1] * len(prompt)
            pos += range(len(prompt))
        for i in range(N):
            for j in range(N):
                pair = batch.pair_ids[b][i][j]
                spans.append((b, where[i], len(ids), len(pair)))
                ids += pair
                group += [i] * len(pair)
                branch += [i * N + j] * len(pair)
                pos += range(len(batch.prompt_ids[b][i]), len(batch.prompt_ids[b][i]) + len(pair))
        rows.append(ids)
        groups.append(group)
        branches.append(branch)
        positions.append(list(pos))
    input_ids, _ = _pad(rows, left=False, device=device)
    L = input_ids.shape[1]
    group = _stack(groups, -1, device)  # padding: group -1, attends only to itself
    branch = _stack(branches, -2, device)
    q, k = torch.arange(L, device=device)[:, None], torch.arange(L, device=device)[None, :]
    allowed = (
        (k <= q)
        & (group[:, :, None] == group[:, None, :])
        & (group[:, :, None] >= 0)
        & ((branch[:, None, :] == -1) | (branch[:, None, :] == branch[:, :, None]))
    ) | (q == k)
    mask = allowed[:, None]
    if TREE_MASK_KIND[attn_implementation] == "additive":  # eager and flex_attention add the mask to the scores
        mask = torch.zeros(mask.shape, dtype=decoder.dtype, device=device).masked_fill(
            ~mask, torch.finfo(decoder.dtype).min
        )
    hidden = decoder(
        input_ids=input_ids, attention_mask=mask, position_ids=_stack(positions, 0, device), use_cache=False
    ).last_hidden_state
    width = max(n for *_, n in spans)
    states = hidden.new_zeros(len(spans), width, hidden.shape[-1])
    targets = torch.zeros(len(spans), width, dtype=torch.long, device=device)
    for r, (b, before, start, n) in enumerate(spans):
        states[r, 0] = hidden[b, before]
        states[r, 1:n] = hidden[b, start : start + n - 1]
        targets[r, :n] = input_ids[b, start : start + n]
    return states, targets


def _full_states(decoder, prompts, pairs, owner, device):
    """No sharing: the N^2 full sequences [prompt_i + response_j], right-padded."""
    full = [prompts[int(owner[r])] + pair for r, pair in enumerate(pairs)]
    f_ids, f_mask = _pad(full, left=False, device=device)
    hidden = decoder(input_ids=f_ids, attention_mask=f_mask, use_cache=False).last_hidden_state
    starts = torch.tensor([len(prompts[int(owner[r])]) for r in range(len(pairs))], device=device)
    cols = (starts[:, None] - 1 + torch.arange(max(map(len, pairs)), device=device)).clamp(max=f_ids.shape[1] - 2)
    return hidden.gather(1, cols[..., None].expand(-1, -1, hidden.shape[-1])), f_ids.gather(1, cols + 1)


def _pair_rows(batch: PairBatch, device):
    """(prompts: row b * N + i, pairs: row (b * N + i) * N + j, owner: the prompt row of each pair row)."""
    B, N = batch.num_queries, batch.num_constitutions
    prompts = [p for per_query in batch.prompt_ids for p in per_query]
    pairs = [batch.pair_ids[b][i][j] for b in range(B) for i in range(N) for j in range(N)]
    return prompts, pairs, torch.arange(B * N, device=device).repeat_interleave(N)


def _scored_states(model, decoder, batch: PairBatch, prefix_sharing: bool, attn: str):
    """(hidden [T, H], targets [T], seq_ids [T]) for every scored response token, seq id (b * N + i) * N + j."""
    device = next(model.parameters()).device
    prompts, pairs, owner = _pair_rows(batch, device)
    way = resolve_attn(model, attn, prefix_sharing)
    if way == "full":
        states, targets = _full_states(decoder, prompts, pairs, owner, device)
    elif way == "cache":
        states, targets = _prefix_cache_states(decoder, prompts, pairs, owner, device)
    else:
        states, targets = _tree_states(decoder, batch, model.config._attn_implementation, device)
    return _scored_tokens(states, targets, pairs)


def _scored_tokens(states, targets, pairs):
    """Per-pair rows (states [rows, R, H], targets [rows, R]) -> (hidden [T, H], targets [T], seq_ids [T]) of the
    scored tokens, seq id = the row."""
    lengths = torch.tensor([len(p) for p in pairs], device=states.device)
    valid = torch.arange(states.shape[1], device=states.device)[None, :] < lengths[:, None]
    seq_ids = torch.arange(len(pairs), device=states.device)[:, None].expand_as(valid)
    return states[valid], targets[valid], seq_ids[valid]


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
    attn: "cache" (prefix pass + KV cache reused by index), "tree" (one packed pass per query with a tree mask;
    works under gradient checkpointing), "auto" (cache, or tree when gradient checkpointing is active); a
    combination with the model's attention implementation that cannot run is refused before any forward (module
    docstring, "Attention modes")."""
    decoder, head, temperature = decoder_and_head(model)
    _check_lengths(batch, model)
    hidden, targets, seq_ids = _scored_states(model, decoder, batch, prefix_sharing, attn)
    B, N = batch.num_queries, batch.num_constitutions
    seq = head_sequence_logprobs(
        head, temperature, hidden, targets, seq_ids, B * N * N, reduction=reduction, backend=backend
    )
    return seq.view(B, N, N)


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
        from .gradcache import cached_step  # gradcache builds on this module

        from torch.distributed.fsdp import FSDPModule

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
