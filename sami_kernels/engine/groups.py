"""Grouped completions: log p(completion | prompt) for B prompts, each with its own list of completions, every prompt
encoded once. GRPO scores G completions of one prompt, DPO two; SAMI's pair matrix is B N prompts each with the same N
completions (pairs.py).

For prompt b of P_b tokens and its completions of C_bj tokens the naive computation runs sum_j (P_b + C_bj) tokens;
prefix sharing runs P_b + sum_j C_bj, exactly:
    1. prefix pass: the prompts, left-padded, through the decoder with use_cache=True;
    2. the cache rows are selected by index so that completion row r holds the prefix of its prompt owner[r]
       (autograd flows through the selection);
    3. completion pass: the completions, right-padded, attending to their prefix's cache, positions continuing the
       true prompt length (each prompt starts at position 0);
    4. the final hidden states that predict completion tokens (the last prompt state, then the completion states) go
       to the fused kernels with the model's own output head: never full-vocabulary logits at every position.

    tokens[r, t] = log softmax(head(h_{r,t}) / temperature)[completion_r[t]]      (0 where t >= len(completion_r))

Attention modes (resolve_attn; read from transformers 5.x: masking_utils, modeling_flash_attention_utils,
integrations/{sdpa,flex}_attention.py, the Llama attention). attn="cache" is the above: 2D padding masks and a KV
cache, which every implementation turns into its own mask (sdpa/eager: a 4D mask with the cache offset; flex: a
BlockMask; flash_attention_2: unpadding and flash_attn_varlen_func, whose bottom-right causal alignment lets each
completion see its whole prefix). attn="tree" runs one packed pass per prompt, [prompt | completion_0 | completion_1
...], with a 4D tree mask, which transformers hands to the attention unchanged: sdpa takes it boolean; eager and
flex_attention add it to the scores (flex as a score_mod), so they get it additive (0 / dtype min);
flash_attention_2 expects a 2D padding mask and is refused. Under gradient checkpointing in training mode
transformers drops the KV cache, so "cache" is refused there. "auto" = "cache", or "tree" under checkpointing; with
flash_attention_2 under checkpointing nothing runs and the error says what to change (sdpa, checkpointing off, or
prefix_sharing=False, which runs plain 2D-masked sequences). Other implementations are refused. Tested exact here:
eager and sdpa; flex_attention's forward through torch's unfused flex reference (on the CPU torch cannot compile flex
attention and has no flex backward).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ..kernels import backends
from ..kernels.ops.sequence import segment_sums
from .head import TOKEN_STATS, decoder_and_head, head_token_logprobs, head_token_stats


@dataclass
class GroupLogprobs:
    """Per completion row r (prompt-major: completion j of prompt b is row sum_{c<b} len(completions[c]) + j):
    tokens [rows, C] float32 log-probs (0 at padding, differentiable), mask [rows, C] bool, sums and means [rows],
    stats: name -> [rows, C] float32 without gradient (head.TOKEN_STATS)."""

    tokens: torch.Tensor
    mask: torch.Tensor
    sums: torch.Tensor
    means: torch.Tensor
    stats: dict[str, torch.Tensor] = field(default_factory=dict)


def group_logprobs(
    model,
    prompts: list[list[int]],
    completions: list[list[list[int]]],
    *,
    temperature: float = 1.0,
    stats: tuple[str, ...] = (),
    attn: str = "auto",
    prefix_sharing: bool = True,
    backend: str = "auto",
) -> GroupLogprobs:
    """log p(completions[b][j] | prompts[b]) token by token, every prompt encoded once (module docstring).

    prompts: B non-empty token-id lists; completions: B lists of non-empty token-id lists. temperature divides the
    logits (after the model's logit_scale). stats: names among head.TOKEN_STATS, computed without gradient.
    attn, prefix_sharing: the attention mode (module docstring); prefix_sharing=False runs every full sequence."""
    owner, flat = _completion_rows(prompts, completions)
    check_lengths(model, prompts, completions, lambda b, j: f"prompt {b}, completion {j}")
    unknown = set(stats) - set(TOKEN_STATS)
    if unknown:
        raise ValueError(f"stats must be among {TOKEN_STATS}, got {sorted(unknown)}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature!r}")
    decoder, head, scale = decoder_and_head(model)
    device = next(model.parameters()).device
    states, targets = completion_states(model, decoder, prompts, flat, owner.to(device), attn, prefix_sharing)
    hidden, targets, seq_ids, mask = _scored_tokens(states, targets, flat)
    logp = head_token_logprobs(head, scale * temperature, hidden, targets, backend=backend)
    tokens = logp.new_zeros(mask.shape).masked_scatter(mask, logp)
    sums, counts = segment_sums(logp, seq_ids, len(flat), backend=backends.resolve(device, backend))
    per_token = head_token_stats(head, scale * temperature, hidden, targets, stats)
    return GroupLogprobs(
        tokens,
        mask,
        sums,
        sums / counts.to(sums.dtype),
        {k: v.new_zeros(mask.shape).masked_scatter(mask, v) for k, v in per_token.items()},
    )


def _completion_rows(prompts, completions) -> tuple[torch.Tensor, list[list[int]]]:
    """(owner: the prompt of each completion row [rows], the completion rows), the inputs checked."""
    if not isinstance(prompts, list | tuple) or not prompts:
        raise ValueError("prompts must be a non-empty list of token-id lists")
    if not isinstance(completions, list | tuple) or len(completions) != len(prompts):
        raise ValueError(
            f"completions must hold one list of completions per prompt ({len(prompts)}), got "
            f"{len(completions) if isinstance(completions, list | tuple) else type(completions).__name__}"
        )
    owner, flat = [], []
    for b, (prompt, group) in enumerate(zip(prompts, completions, strict=True)):
        if not prompt:
            raise ValueError(f"prompt {b} is empty (it needs at least one token, e.g. BOS)")
        if not group:
            raise ValueError(f"prompt {b} has no completion")
        for j, completion in enumerate(group):
            if not completion:
                raise ValueError(f"prompt {b}, completion {j} is empty")
            owner.append(b)
            flat.append(list(completion))
    return torch.tensor(owner), flat


def check_lengths(model, prompts, completions, where: Callable[[int, int], str]) -> None:
    """Every prompt + completion within the model's maximum length; where(b, j) names an offending pair."""
    limit = getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", None)
    if limit is None:
        return
    for b, (prompt, group) in enumerate(zip(prompts, completions, strict=True)):
        for j, completion in enumerate(group):
            if len(prompt) + len(completion) > limit:
                raise ValueError(
                    f"{where(b, j)}: {len(prompt) + len(completion)} tokens exceed the model's maximum of {limit}"
                )


def completion_states(model, decoder, prompts, completions, owner, attn: str, prefix_sharing: bool):
    """(states predicting each completion token [rows, C, H], completion ids [rows, C]), the way resolve_attn picks."""
    device = owner.device
    way = resolve_attn(model, attn, prefix_sharing)
    if way == "full":
        return _full_states(decoder, prompts, completions, owner, device)
    if way == "cache":
        return _prefix_cache_states(decoder, prompts, completions, owner, device)
    return _tree_states(decoder, prompts, completions, owner, model.config._attn_implementation, device)


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
    """The model's attention implementation, refused unless the engine knows how it treats masks."""
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


def _response_states(decoder, last_prefix, cache, p_mask, completions, device):
    """The completion pass on top of the prefixes (last_prefix, cache and p_mask already hold row r's prefix in row r):
    (states predicting each completion token [rows, C, H], the completion ids [rows, C])."""
    r_ids, r_mask = _pad(completions, left=False, device=device)
    r_pos = p_mask.sum(-1)[:, None] + torch.arange(r_ids.shape[1], device=device)
    response = decoder(
        input_ids=r_ids,
        attention_mask=torch.cat([p_mask, r_mask], dim=1),
        position_ids=r_pos,
        past_key_values=cache,
        use_cache=True,
    )
    return torch.cat([last_prefix[:, None], response.last_hidden_state[:, :-1]], dim=1), r_ids


def _prefix_cache_states(decoder, prompts, completions, owner, device):
    """Prefix pass with use_cache, cache rows selected per completion, then the completion pass on top of it."""
    last_prefix, cache, p_mask = _prefix_pass(decoder, prompts, device)
    cache.batch_select_indices(owner)  # completion row r <- prefix owner[r]
    return _response_states(decoder, last_prefix[owner], cache, p_mask[owner], completions, device)


def _full_states(decoder, prompts, completions, owner, device):
    """No sharing: every full sequence [prompt + completion], right-padded."""
    full = [prompts[int(owner[r])] + completion for r, completion in enumerate(completions)]
    f_ids, f_mask = _pad(full, left=False, device=device)
    hidden = decoder(input_ids=f_ids, attention_mask=f_mask, use_cache=False).last_hidden_state
    starts = torch.tensor([len(prompts[int(owner[r])]) for r in range(len(completions))], device=device)
    cols = (starts[:, None] - 1 + torch.arange(max(map(len, completions)), device=device)).clamp(max=f_ids.shape[1] - 2)
    return hidden.gather(1, cols[..., None].expand(-1, -1, hidden.shape[-1])), f_ids.gather(1, cols + 1)


def _scored_tokens(states, targets, completions):
    """Completion rows (states [rows, C, H], targets [rows, C]) -> (hidden [T, H], targets [T], seq_ids [T]) of the
    scored tokens, seq id = the row, and their mask [rows, C]."""
    lengths = torch.tensor([len(c) for c in completions], device=states.device)
    valid = torch.arange(states.shape[1], device=states.device)[None, :] < lengths[:, None]
    seq_ids = torch.arange(len(completions), device=states.device)[:, None].expand_as(valid)
    return states[valid], targets[valid], seq_ids[valid], valid


def _tree_states(decoder, prompts, completions, owner, attn_implementation: str, device):
    """One packed pass per prompt: [prompt | completion 0 | completion 1 | ...] with a tree mask (a position sees the
    positions <= it of the prompt and of its own completion only), each completion's positions continuing the prompt.
    No cache, so it works under gradient checkpointing; dense attention over the packed length."""
    rows, branches, positions, spans = [], [], [], []  # span of completion row r: (packed row, prompt end, start, len)
    for b, prompt in enumerate(prompts):
        ids, branch, pos = list(prompt), [-1] * len(prompt), list(range(len(prompt)))
        for r in (owner == b).nonzero()[:, 0].tolist():
            spans.append((b, len(prompt) - 1, len(ids), len(completions[r])))
            ids += completions[r]
            branch += [r] * len(completions[r])
            pos += range(len(prompt), len(prompt) + len(completions[r]))
        rows.append(ids)
        branches.append(branch)
        positions.append(pos)
    input_ids, _ = _pad(rows, left=False, device=device)
    L = input_ids.shape[1]
    branch = _stack(branches, -2, device)  # padding: branch -2, attends only to itself
    q, k = torch.arange(L, device=device)[:, None], torch.arange(L, device=device)[None, :]
    real = branch >= -1
    allowed = (
        (k <= q)
        & real[:, :, None]
        & real[:, None, :]
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
