"""One SAMI step (forward + backward of the InfoNCE loss) on SmolLM2-135M, fp32, CPU, side by side:

    engine       sami_kernels.sami_step_loss: each prompt encoded once, its KV cache reused by the N responses,
                 fused head (attn="cache", the default)
    engine-tree  the same with attn="tree": one packed pass per query with a tree attention mask, no padding
    engine-chunked  the engine with max_pairs_per_pass = N (gradient caching: prefix passes of N prompts and response
                 passes of N pairs, each prefix and response run forward twice): activations of one such pass
                 instead of all B N prompts and B N^2 responses
    engine-chunked-2  the same with max_pairs_per_pass = 2: passes of 2 prompts or 2 pairs
    naive   the reference code's way: N^2 padded [prompt + response] sequences, full-vocabulary logits at every
            position, fp32 log_softmax, gather, mean over response tokens, InfoNCE

B = 2 queries (and B = 1 at N = 4 and N = 8), prompts of ~300 tokens, responses of ~100 tokens (random token
ids, ragged).
Useful work is counted as 6 x parameters x (tokens the engine sends through the model: N P + N^2 R per query).
Run: python benchmarks/bench_pairs.py [--filter N4] [--reps 2]
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import runner  # noqa: E402

PARAMS, HIDDEN, MLP = 134_515_008, 576, 1536
P, R = 300, 100


def _cases():
    cases = []
    for B, N in ((2, 2), (2, 4), (1, 4), (1, 8)):  # naive needs more than 24 GiB at B=2, N=4
        tokens = B * (N * P + N * N * R)
        shape = f"B{B}xN{N}xP{P}xR{R}"
        cases.append(
            {
                "op": "sami_step",
                "mode": "train",
                "shape": shape,
                "dtype": "float32",
                "B": B,
                "N": N,
                "flops": 6 * PARAMS * tokens,
                "mm_shape": [tokens, HIDDEN, MLP],
            }
        )
    return cases


def build(provider: str, case: dict):
    import torch

    import sami_kernels as sk
    from sami_kernels.engine.models import load_smollm2
    from sami_kernels.engine.pairs import PairBatch

    torch.manual_seed(0)
    model, tokenizer = load_smollm2()
    model.train()
    B, N, V = case["B"], case["N"], model.config.vocab_size
    length = lambda mean: mean + int(torch.randint(-mean // 10, mean // 10 + 1, (1,)))  # noqa: E731
    tokens = lambda n: torch.randint(3, V, (n,)).tolist()  # noqa: E731
    prompts = [[[tokenizer.bos_token_id, *tokens(length(P) - 1)] for _ in range(N)] for _ in range(B)]
    responses = [[tokens(length(R)) for _ in range(N)] for _ in range(B)]
    batch = PairBatch(prompts, responses, [[r] * N for r in responses])

    if provider in ("engine", "engine-tree"):
        attn = "tree" if provider == "engine-tree" else "cache"

        def step():
            loss, _ = sk.sami_step_loss(model, batch, attn=attn)
            loss.backward()
    elif provider in ("engine-chunked", "engine-chunked-2"):
        k = N if provider == "engine-chunked" else 2

        def step():
            sk.sami_step_loss(model, batch, max_pairs_per_pass=k)  # runs its own backward
    elif provider == "naive":

        def step():
            sk.reference.infonce_loss(sk.reference.pair_logprobs_naive(model, batch)).backward()

    else:
        raise ValueError(f"unknown provider {provider!r}")
    return step


if __name__ == "__main__":
    runner.main(__file__, ["engine", "engine-tree", "engine-chunked", "engine-chunked-2", "naive"], _cases(), build)
