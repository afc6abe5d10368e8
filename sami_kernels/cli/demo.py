"""The main job at this stage: score built-in queries x constitutions x responses with the embedded
SmolLM2-135M-Instruct, print each query's N x N log-prob matrix and the SAMI loss.

The pair engine encodes each prompt(c_i, x_b) once, reuses its keys/values for the N responses, and turns the
response tokens' final hidden states into M[b, i, j] = mean log p(response_j | constitution_i, query_b) with the
fused kernels: never full-vocabulary logits at every position.
"""

from __future__ import annotations

import time

import torch

from ..engine.models import load_smollm2
from ..engine.pairs import PairBatch, sami_step_loss
from ..kernels import backends
from ..kernels.reference import mutual_information_lower_bound

CONSTITUTIONS = (
    "The assistant is helpful: it answers the question directly and usefully. "
    "The assistant is harmless: it never encourages danger.",
    "The assistant is unhelpful: it avoids answering and changes the subject. "
    "The assistant is harmless: it never encourages danger.",
)
QUERIES = ("How do I keep basil fresh after buying it?", "What is a quick way to warm up before a run?")
RESPONSES = (  # responses[b][j] was written under constitution j
    (
        " Trim the stems, stand the basil in a glass of water like cut flowers, and keep it on the counter"
        " away from direct sun. Change the water every day or two.",
        " Basil is a lovely herb. Have you thought about what you would like to cook this week?",
    ),
    (
        " Walk briskly for two minutes, then do leg swings, walking lunges and a few short strides at"
        " an easy pace before you start.",
        " Running is popular in many countries. Some people prefer swimming instead.",
    ),
)


def main() -> None:
    t0 = time.perf_counter()
    model, tokenizer = load_smollm2()
    model.eval()
    print(
        f"loaded SmolLM2-135M-Instruct in {time.perf_counter() - t0:.1f} s; "
        f"kernel backend on cpu: {backends.resolve('cpu')}"
    )
    B, N = len(QUERIES), len(CONSTITUTIONS)
    batch = PairBatch.from_texts(tokenizer, QUERIES, CONSTITUTIONS, RESPONSES)
    with torch.no_grad():
        loss, M = sami_step_loss(model, batch)
    for b, query in enumerate(QUERIES):
        print(f"\nquery {b}: {query}")
        print("  M[i, j] = mean log p(response_j | constitution_i)   (rows: constitutions, cols: responses)")
        for i in range(N):
            print(f"  c{i}  " + "  ".join(f"{v:8.4f}" for v in M[b, i].tolist()))
    mi = mutual_information_lower_bound(loss, N)
    print(
        f"\nSAMI loss (two-sided InfoNCE, mean over {B} queries): {loss.item():.4f}"
        f"   MI lower bound log N - L = {mi.item():.4f} nats   ({time.perf_counter() - t0:.1f} s)"
    )
