"""Gradient caching over pair chunks (Gao et al. 2021, "Scaling Deep Contrastive Learning Batch Size under Memory
Limited Setup"): SAMI's step with activation memory independent of N^2.

SAMI's InfoNCE L needs all of M [B, N, N] before any gradient, but dL/dM has only B N^2 numbers. With k =
max_pairs_per_pass, the B N^2 pair rows r = (b * N + i) * N + j are cut into chunks of at most k consecutive rows:

    1. prefix pass with autograd over the B N prompts (pairs._prefix_pass); its outputs (every layer's keys and
       values, the last prompt state) are copied into leaf tensors that require grad;
    2. without autograd, per chunk: the response pass on the chunk's rows of the leaves -> M[chunk], the CPU (and
       CUDA) RNG state before it kept; then L = InfoNCE(M) and G = loss_scale * dL/dM;
    3. per chunk but the last, with autograd: the chunk's RNG state restored (so dropout draws the masks of step 2),
       the response pass again on the leaves, backward of M[chunk] with upstream G[chunk]: parameter gradients
       accumulate in .grad, the cache's in the leaves' .grad; the chunk's activations are then freed;
    4. the last chunk's response pass runs on the prefix pass's own outputs t (not on the leaves), and
           remainder = <M[last], G[last]> + sum_t <t, leaf(t).grad>
       is returned: remainder.backward() adds the last chunk's gradients and sends the accumulated cache gradients
       through the prefix pass, in one backward that reaches every parameter.

The gradients are those of loss_scale * L backpropagated through one graph, up to summation order; the cost is one
extra response forward (step 2).

Activation memory per query (N prompts of P tokens, N^2 responses of R tokens, k pairs per chunk):
    one pass (pairs.py):   N P (prefix)  +  N^2 R (every response)
    chunked (here):        N P (prefix)  +  k R (one chunk)  +  the prefix KV cache's gradient (its size)
the N^2 R term becomes k R, whatever N. Under gradient checkpointing (transformers drops caches in checkpointed
layers) the layers' own checkpointing is off for these passes and the prefix pass is checkpointed as a whole
instead: its activations are not kept across the chunks but recomputed once, in remainder.backward(); a chunk's
activations live from its forward to its backward only.

DDP: every backward but remainder.backward() runs inside this call; run it as DistributedDataParallel's forward
(PairScorer.forward) and those backwards find DDP's reducer expecting no gradients (they accumulate locally), while
remainder.backward() is the one that synchronises.
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass, replace

import torch
from torch.utils.checkpoint import checkpoint

from ..kernels.ops.infonce import infonce_loss
from .head import decoder_and_head, head_sequence_logprobs
from .pairs import (
    PairBatch,
    _check_lengths,
    _checkpointing,
    _pair_rows,
    _prefix_pass,
    _response_states,
    _scored_tokens,
    check_attn_implementation,
)


@dataclass
class _Prefix:
    """The prefix pass's outputs: last prompt state [B N, H], each layer's keys and values [B N, heads, P, d], the
    cache they came in (the layer types a chunk's cache copies) and the prompts' attention mask."""

    last: torch.Tensor
    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    cache: object
    mask: torch.Tensor

    def tensors(self) -> list[torch.Tensor]:
        return [self.last, *self.keys, *self.values]

    def leaves(self) -> _Prefix:
        leaf = lambda t: t.detach().requires_grad_()  # noqa: E731
        return replace(self, last=leaf(self.last), keys=[*map(leaf, self.keys)], values=[*map(leaf, self.values)])

    def rows(self, select: torch.Tensor):
        """(last state, cache, mask) of prompt rows `select`: a copy of the cache holding those rows."""
        cache = copy.copy(self.cache)
        cache.layers = [copy.copy(layer) for layer in self.cache.layers]
        for layer, k, v in zip(cache.layers, self.keys, self.values, strict=True):
            layer.keys, layer.values = k[select], v[select]
        return self.last[select], cache, self.mask[select]


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
    """(remainder, loss, M): steps 1-4 of the module docstring. loss (the InfoNCE, unscaled) and M [B, N, N] are
    detached; the gradients of loss_scale * loss are in .grad once the caller has run remainder.backward()."""
    if isinstance(max_pairs_per_pass, bool) or not isinstance(max_pairs_per_pass, int) or max_pairs_per_pass < 1:
        raise ValueError(f"max_pairs_per_pass must be an int >= 1 (or None: one pass), got {max_pairs_per_pass!r}")
    if attn not in ("auto", "cache"):
        raise ValueError(
            f"max_pairs_per_pass chunks the KV-cache path: attn must be 'auto' or 'cache', got {attn!r} "
            "(or max_pairs_per_pass=None for one pass)"
        )
    check_attn_implementation(model)  # the cache path runs under every known one (pairs.py)
    decoder, head, temperature = decoder_and_head(model)
    _check_lengths(batch, model)
    device = next(model.parameters()).device
    prompts, pairs, owner = _pair_rows(batch, device)
    chunks = [slice(s, s + max_pairs_per_pass) for s in range(0, len(pairs), max_pairs_per_pass)]

    def score(prefix: _Prefix, rows: slice) -> torch.Tensor:
        """M's entries of pair rows `rows`: the response pass on their prefixes, the fused head."""
        states, targets = _response_states(decoder, *prefix.rows(owner[rows]), pairs[rows], device)
        hidden, targets, seq_ids = _scored_tokens(states, targets, pairs[rows])
        count = len(pairs[rows])
        return head_sequence_logprobs(
            head, temperature, hidden, targets, seq_ids, count, reduction="mean", backend=backend
        )

    checkpointed = _checkpointing(model)
    with _layer_checkpointing_off(model):
        prefix = _prefix(model, decoder, prompts, device, checkpointed=checkpointed)
        leaves = prefix.leaves()
        states, values = [], []  # the RNG state before each chunk's pass, M's entries
        with torch.no_grad():
            for rows in chunks:
                states.append(_rng_state(device))
                values.append(score(leaves, rows))
        M = torch.cat(values).view(batch.num_queries, batch.num_constitutions, -1).requires_grad_()
        loss = infonce_loss(M, direction=direction, backend=backend)
        (upstream,) = torch.autograd.grad(loss * loss_scale, M)
        upstream = upstream.flatten()
        for rows, state in zip(chunks[:-1], states[:-1], strict=True):
            _set_rng_state(state, device)
            torch.autograd.backward(score(leaves, rows), upstream[rows])
        _set_rng_state(states[-1], device)
        remainder = (score(prefix, chunks[-1]) * upstream[chunks[-1]]).sum()
    for t, leaf in zip(prefix.tensors(), leaves.tensors(), strict=True):
        if leaf.grad is not None:
            remainder = remainder + (t * leaf.grad).sum()
    return remainder, loss.detach(), M.detach()


def _prefix(model, decoder, prompts, device, *, checkpointed: bool) -> _Prefix:
    """Step 1; checkpointed: as one torch.utils.checkpoint region (its recomputation, in the backward, switches the
    layers' own checkpointing off again)."""

    def run():
        with _layer_checkpointing_off(model):
            return _prefix_pass(decoder, prompts, device)

    last, cache, mask = checkpoint(run, use_reentrant=False) if checkpointed else run()
    keys = [layer.keys for layer in cache.layers]
    values = [layer.values for layer in cache.layers]
    return _Prefix(last, keys, values, cache, mask)


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
