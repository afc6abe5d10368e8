"""The log-prob forward + backward of a TRL 1.16 training step on SmolLM2-135M, fp32, CPU, stock against shared
prompts (generation excluded; the same completions for both):

    stock    TRL's own fused-LM-head forward (trl.trainer.utils.add_fused_lm_head), as GRPOTrainer and DPOTrainer
             call it: every row [prompt + completion] through the decoder, log-probs (and the trainer's per-token
             statistics) of the completion tokens in chunks
    shared   the same forward with sami_kernels.integrations.trl.share_prompts_in_forward: each distinct prompt
             through the decoder once, its KV cache reused by its completions, the fused head on completion states

    grpo   1 prompt of ~300 tokens, G = 8 completions of ~100 tokens (ragged); statistics: entropy (what GRPO asks)
    dpo    2 prompts of ~300 tokens, a chosen and a rejected completion of ~100 tokens each; statistics: entropy,
           mean_logits, is_top1 (what DPO asks)

The backward is that of sum(log_probs * w) with random per-token weights w (advantages / DPO's gradient are
per-sequence or per-token numbers; their values do not change the cost). Useful work is counted as
6 x parameters x (tokens the shared path sends through the model: P + sum of completions per prompt).
Run: python benchmarks/bench_trl.py [--filter grpo] [--reps 1]
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import runner  # noqa: E402

PARAMS, HIDDEN, MLP = 134_515_008, 576, 1536
P, C = 300, 100
STATS = {"grpo": ("log_probs", "entropy"), "dpo": ("log_probs", "entropy", "mean_logits", "is_top1")}


def _cases():
    cases = []
    for trainer, prompts, per_prompt in (("grpo", 1, 8), ("dpo", 2, 2)):
        tokens = prompts * (P + per_prompt * C)
        cases.append(
            {
                "op": "trl_logprobs",
                "mode": trainer,
                "shape": f"B{prompts}xG{per_prompt}xP{P}xC{C}",
                "dtype": "float32",
                "prompts": prompts,
                "per_prompt": per_prompt,
                "flops": 6 * PARAMS * tokens,
                "mm_shape": [tokens, HIDDEN, MLP],
            }
        )
    return cases


def _batch(case: dict, vocab: int, bos: int):
    """(input_ids, attention_mask, labels) as the trainer builds them: GRPO left-pads the prompts and right-pads the
    completions, its rows prompt-major; DPO right-pads [prompt + completion], all chosen rows then all rejected."""
    import torch

    length = lambda mean: mean + int(torch.randint(-mean // 10, mean // 10 + 1, (1,)))  # noqa: E731
    tokens = lambda n: torch.randint(3, vocab, (n,)).tolist()  # noqa: E731
    prompts = [[bos, *tokens(length(P) - 1)] for _ in range(case["prompts"])]
    completions = [[tokens(length(C)) for _ in range(case["per_prompt"])] for _ in prompts]
    if case["mode"] == "grpo":
        rows = [(p, c) for p, group in zip(prompts, completions, strict=True) for c in group]
    else:
        rows = [(p, group[k]) for k in range(2) for p, group in zip(prompts, completions, strict=True)]
    left = case["mode"] == "grpo"  # prompts end in one column
    prompt_end = max(len(p) for p, _ in rows) if left else 0
    width = max((prompt_end if left else len(p)) + len(c) for p, c in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    labels = torch.full((len(rows), width), -100)
    for r, (p, c) in enumerate(rows):
        start = prompt_end - len(p) if left else 0
        row = torch.tensor(p + c)
        ids[r, start : start + len(row)] = row
        mask[r, start : start + len(row)] = 1
        labels[r, start + len(p) : start + len(row)] = torch.tensor(c)
    return ids, mask, labels


def build(provider: str, case: dict):
    import torch
    from trl.trainer.utils import add_fused_lm_head

    from sami_kernels.engine.models import load_smollm2

    torch.manual_seed(0)
    model, tokenizer = load_smollm2()
    model.train()
    ids, mask, labels = _batch(case, model.config.vocab_size, tokenizer.bos_token_id)
    weights = torch.randn(ids.shape[0], ids.shape[1] - 1)
    add_fused_lm_head(model, outputs=STATS[case["mode"]])
    if provider == "shared":
        from sami_kernels.integrations.trl import share_prompts_in_forward

        share_prompts_in_forward(model)
    elif provider != "stock":
        raise ValueError(f"unknown provider {provider!r}")

    def step():
        out = model(input_ids=ids, attention_mask=mask, labels=labels, fused_lm_head=True, use_cache=False)
        (out.log_probs * weights).sum().backward()

    return step


if __name__ == "__main__":
    runner.main(__file__, ["stock", "shared"], _cases(), build)
