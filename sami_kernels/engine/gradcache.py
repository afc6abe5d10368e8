"""Gradient caching over pair chunks (Gao et al. 2021, "Scaling Deep Contrastive Learning Batch Size under Memory
Limited Setup"): SAMI's step with activation memory independent of N^2 and of the batch.

SAMI's InfoNCE L needs all of M [B, N, N] before any gradient, but dL/dM has only B N^2 numbers. With k =
max_pairs_per_pass, no pass with autograd holds more than k rows: the B N prompt rows are cut into groups of at most
k consecutive rows, and the pair rows r = (b * N + i) * N + j of each group's prompts into chunks of at most k rows.

    1. without autograd, per group: the prefix pass (groups._prefix_pass) -> every layer's keys and values and the last
       prompt state, copied into leaf tensors that require grad ("leaves"), the RNG state before it kept;
    2. without autograd, per chunk: the response pass on the chunk's rows of the leaves -> M[chunk], the RNG state
       before it kept; then L = InfoNCE(M) and G = loss_scale * dL/dM;
    3. per chunk but the last, with autograd and its RNG state restored (dropout draws the masks of step 2): the
       response pass on the leaves, backward of M[chunk] with upstream G[chunk]; parameter gradients accumulate in
       .grad, the prefixes' in the leaves' .grad, and the chunk's activations are freed;
    4. per group but the last, with autograd and its RNG state restored: the prefix pass again -> t, backward of
       sum <t, leaf(t).grad>; the group's activations are freed;
    5. the last group: its prefix pass again -> t, the last chunk's response pass on t (not on the leaves), and
           remainder = <M[last], G[last]> + sum_t <t, leaf(t).grad>
       is returned: remainder.backward() adds the last chunk's gradients and sends the last group's cache gradients
       through its prefix pass. Every forward with autograd is followed by its own backward before the next one
       starts, except in step 5, where the last chunk runs on the prefix pass it belongs to.

The gradients are those of loss_scale * L backpropagated through one graph, up to summation order; the cost is one
extra forward of every prefix and every response (steps 1 and 2).

Activation memory (N prompts of P tokens and N^2 responses of R tokens per query, B queries, k rows per pass):
    one pass (pairs.py):   B N P (prefixes)  +  B N^2 R (every response)
    chunked (here):        k P (one group's prefixes)  +  k R (one chunk)  +  2 x the KV cache of the B N prefixes
                           (the leaves and their gradients)
whatever N and B. transformers drops KV caches in layers that checkpoint their activations, so the layers' own
gradient checkpointing is switched off for these passes: the prefix passes are recomputed here anyway (step 4), and
a chunk's activations live from its forward to its backward only.

DDP: every backward but remainder.backward() runs inside this call; run it as DistributedDataParallel's forward
(PairScorer.forward) and those backwards find DDP's reducer expecting no gradients (they accumulate locally), while
remainder.backward(), which reaches every parameter the step uses (the last chunk the head, the last prefix pass the
decoder), is the one that synchronises. FSDP2: each backward reduce-scatters into the sharded gradients, whose sum is
the gradient of the step.
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass, replace

import torch

from ..kernels.ops.infonce import infonce_loss
from .groups import _prefix_pass, _response_states, _scored_tokens, check_attn_implementation
from .head import decoder_and_head, head_sequence_logprobs
from .pairs import PairBatch, _check_lengths, _pair_rows


@dataclass
class _Prefix:
    """A prefix pass's outputs for one group of prompt rows: last prompt state [rows, H], each layer's keys and values
    [rows, heads, P, d], the cache they came in (the layer types a chunk's cache copies) and the prompts' attention
    mask."""

    last: torch.Tensor
    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    cache: object
    mask: torch.Tensor

    @classmethod
    def run(cls, decoder, prompts, device) -> _Prefix:
        last, cache, mask = _prefix_pass(decoder, prompts, device)
        return cls(last, [layer.keys for layer in cache.layers], [layer.values for layer in cache.layers], cache, mask)

    def tensors(self) -> list[torch.Tensor]:
        return [self.last, *self.keys, *self.values]

    def leaves(self) -> _Prefix:
        leaf = lambda t: t.detach().requires_grad_()  # noqa: E731
        return replace(self, last=leaf(self.last), keys=[*map(leaf, self.keys)], values=[*map(leaf, self.values)])

    def rows(self, select: torch.Tensor):
        """(last state, cache, mask) of this group's rows `select`: a copy of the cache holding those rows."""
        cache = copy.copy(self.cache)
        cache.layers = [copy.copy(layer) for layer in self.cache.layers]
        for layer, k, v in zip(cache.layers, self.keys, self.values, strict=True):
            layer.keys, layer.values = k[select], v[select]
        return self.last[select], cache, self.mask[select]

    def cotangent(self, leaves: _Prefix) -> torch.Tensor:
        """sum <t, leaf(t).grad> over this pass's outputs t: its backward sends the leaves' gradients through it."""
        pairs = zip(self.tensors(), leaves.tensors(), strict=True)
        return sum((t * leaf.grad).sum() for t, leaf in pairs if leaf.grad is not None)


def cached_step(
    model,
    batch: PairBatch,
    *,
    max_pairs_per_pass: int,
    direction: str = "both",
    loss_scale: float = 1.0,
    attn: str = "auto",
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(remainder, loss, M): steps 1-5 of the module docstring. loss (the InfoNCE, unscaled) and M [B, N, N] are
    detached; the gradients of loss_scale * loss are in .grad once the caller has run remainder.backward()."""
    k = max_pairs_per_pass
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"max_pairs_per_pass must be an int >= 1 (or None: one pass), got {k!r}")
    if attn not in ("auto", "cache"):
        raise ValueError(
            f"max_pairs_per_pass chunks the KV-cache path: attn must be 'auto' or 'cache', got {attn!r} "
            "(or max_pairs_per_pass=None for one pass)"
        )
    check_attn_implementation(model)  # the cache path runs under every known one (groups.py)
    decoder, head, temperature = decoder_and_head(model)
    _check_lengths(batch, model)
    device = next(model.parameters()).device
    prompts, pairs, owner = _pair_rows(batch, device)
    N = batch.num_constitutions
    groups = [range(s, min(s + k, len(prompts))) for s in range(0, len(prompts), k)]
    # a chunk: (its group, its pair rows); the pair rows of group g are N * g.start ... N * g.stop - 1
    chunks = [
        (g, slice(s, min(s + k, N * rows.stop)))
        for g, rows in enumerate(groups)
        for s in range(N * rows.start, N * rows.stop, k)
    ]

    def score(prefix: _Prefix, g: int, rows: slice) -> torch.Tensor:
        """M's entries of pair rows `rows` (of group g): the response pass on their prefixes, the fused head."""
        select = owner[rows] - groups[g].start
        states, targets = _response_states(decoder, *prefix.rows(select), pairs[rows], device)
        hidden, targets, seq_ids, _ = _scored_tokens(states, targets, pairs[rows])
        return head_sequence_logprobs(
            head, temperature, hidden, targets, seq_ids, len(pairs[rows]), reduction="mean", backend=backend
        )

    def prefix_of(g: int) -> _Prefix:
        return _Prefix.run(decoder, [prompts[r] for r in groups[g]], device)

    with _layer_checkpointing_off(model):
        group_rng, leaves = [], []
        with torch.no_grad():
            for g in range(len(groups)):
                group_rng.append(_rng_state(device))
                leaves.append(prefix_of(g).leaves())
            chunk_rng, values = [], []
            for g, rows in chunks:
                chunk_rng.append(_rng_state(device))
                values.append(score(leaves[g], g, rows))
        M = torch.cat(values).view(batch.num_queries, N, N).requires_grad_()
        loss = infonce_loss(M, direction=direction, backend=backend)
        (upstream,) = torch.autograd.grad(loss * loss_scale, M)
        upstream = upstream.flatten()
        for (g, rows), state in zip(chunks[:-1], chunk_rng[:-1], strict=True):
            _set_rng_state(state, device)
            torch.autograd.backward(score(leaves[g], g, rows), upstream[rows])
        for g in range(len(groups) - 1):
            _set_rng_state(group_rng[g], device)
            prefix_of(g).cotangent(leaves[g]).backward()
        last, rows = chunks[-1]
        _set_rng_state(group_rng[last], device)
        prefix = prefix_of(last)
        _set_rng_state(chunk_rng[-1], device)
        remainder = (score(prefix, last, rows) * upstream[rows]).sum() + prefix.cotangent(leaves[last])
    return remainder, loss.detach(), M.detach()


@contextlib.contextmanager
def _layer_checkpointing_off(model):
    """transformers' per-layer gradient checkpointing switched off (it drops KV caches), restored on exit."""
    layers = [m for m in model.modules() if getattr(m, "gradient_checkpointing", False)]
    for m in layers:
        m.gradient_checkpointing = False
    try:
        yield
    finally:
        for m in layers:
            m.gradient_checkpointing = True


def _rng_state(device: torch.device):
    return torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None


def _set_rng_state(state, device: torch.device) -> None:
    cpu, cuda = state
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state(cuda, device)
