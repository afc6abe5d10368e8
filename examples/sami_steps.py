"""A few SAMI optimiser steps on the embedded SmolLM2-135M with the fused pair engine: what a trainer's step does.

    python examples/sami_steps.py [--steps 3] [--lr 1e-5]

The loss is SAMI's two-sided InfoNCE over M[b, i, j] = mean log p(response_j | constitution_i, query_b); each
prompt is encoded once and only response positions reach the output head. Built-in texts from the demo.
"""

import argparse

import torch

import sami_kernels as sk
from sami_kernels.cli import demo
from sami_kernels.engine.models import load_smollm2


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--lr", type=float, default=1e-5)
    args = parser.parse_args()

    torch.manual_seed(0)
    model, tokenizer = load_smollm2()
    model.train()
    batch = sk.PairBatch.from_texts(tokenizer, demo.QUERIES, demo.CONSTITUTIONS, demo.RESPONSES)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
    for step in range(args.steps):
        loss, M = sk.sami_step_loss(model, batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        mi = sk.reference.mutual_information_lower_bound(loss.detach(), batch.num_constitutions)
        diagonal = torch.diagonal(M, dim1=-2, dim2=-1).mean()
        print(f"step {step}: loss {loss.item():.4f}  MI bound {mi.item():.4f} nats  mean diagonal log p {diagonal:.4f}")


if __name__ == "__main__":
    main()
