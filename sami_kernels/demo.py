"""The main job at this stage: score built-in queries x constitutions x responses with the embedded
SmolLM2-135M-Instruct, print each query's N x N log-prob matrix and the SAMI loss.

The matrix is built the direct way (N^2 full sequences through the model); the fused kernels then turn the
response tokens' final hidden states into M[b, i, j] = mean log p(response_j | constitution_i, query_b) and
the InfoNCE loss without ever forming [tokens x vocab] logits.
"""

from __future__ import annotations

import time

import torch

from . import backends
from .models import load_smollm2
from .ops.sequence import sami_loss
from .reference import mutual_information_lower_bound

TEMPLATE = "System: {constitution}\n\nHuman: {query}\n\nAssistant:"
CONSTITUTIONS = (
    "The assistant is helpful: it answers the question directly and usefully. "
    "The assistant is harmless: it never encourages danger.",
    "The assistant is unhelpful: it avoids answering and changes the subject. "
    "The assistant is harmless: it never encourages danger.",
)
QUERIES = (
    "How do I keep basil fresh after buying it?",
    "What is a quick way to warm up before a run?",
)
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


def build_pairs(tokenizer, queries, constitutions, responses):
    """Token ids of every [BOS + prompt(c_i, x_b) + response_j] and how many of its tokens are the response."""
    sequences, response_lengths = [], []
    for b, query in enumerate(queries):
        for constitution in constitutions:
            prompt = tokenizer(TEMPLATE.format(constitution=constitution, query=query), add_special_tokens=False)
            for response in responses[b]:
                answer = tokenizer(response, add_special_tokens=False).input_ids
                sequences.append([tokenizer.bos_token_id, *prompt.input_ids, *answer])
                response_lengths.append(len(answer))
    return sequences, response_lengths


def response_states(model, sequences, response_lengths, pad_id):
    """(hidden [T, H], targets [T], seq_ids [T]): final hidden states that predict each response token."""
    width = max(map(len, sequences))
    ids = torch.tensor([s + [pad_id] * (width - len(s)) for s in sequences])
    mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in sequences])
    states = model.model(input_ids=ids, attention_mask=mask).last_hidden_state
    hidden, targets, seq_ids = [], [], []
    for s, (seq, n) in enumerate(zip(sequences, response_lengths, strict=True)):
        start = len(seq) - n  # first response position; the state before it predicts it
        hidden.append(states[s, start - 1 : len(seq) - 1])
        targets.append(ids[s, start : len(seq)])
        seq_ids.append(torch.full((n,), s))
    return torch.cat(hidden), torch.cat(targets), torch.cat(seq_ids)


def main() -> None:
    t0 = time.perf_counter()
    model, tokenizer = load_smollm2()
    model.eval()
    print(
        f"loaded SmolLM2-135M-Instruct in {time.perf_counter() - t0:.1f} s; "
        f"kernel backend on cpu: {backends.resolve('cpu')}"
    )
    B, N = len(QUERIES), len(CONSTITUTIONS)
    sequences, lengths = build_pairs(tokenizer, QUERIES, CONSTITUTIONS, RESPONSES)
    with torch.no_grad():
        hidden, targets, seq_ids = response_states(model, sequences, lengths, tokenizer.pad_token_id)
        loss, M = sami_loss(hidden, model.lm_head.weight, targets, seq_ids, num_queries=B, num_constitutions=N)
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
