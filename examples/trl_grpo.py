"""GRPO with TRL 1.16 on the embedded SmolLM2-135M-Instruct, each prompt's completions scored with one decoder pass
of the prompt (SharedPromptGRPOTrainer).

    python examples/trl_grpo.py [--queries 4] [--generations 4] [--steps 2]

Prompts are the built-in dialogue queries; the reward is programmatic: the share of the query's content words (four
letters or more) that the completion repeats, an on-topic score. Each step generates --generations completions for
each of the step's prompts, and all of them are scored in the same forward (steps_per_generation=1), so every prompt
runs through the decoder once for the policy, once for the reference.
"""

import argparse
import re
import tempfile
import time

from datasets import Dataset
from trl import GRPOConfig

from sami_kernels.engine.models import load_smollm2
from sami_kernels.integrations.trl import SharedPromptGRPOTrainer
from sami_kernels.recipes.data import load_queries


def content_words(text: str) -> set[str]:
    return {w for w in re.findall(r"[a-z]+", text.lower()) if len(w) >= 4}


def on_topic(prompts, completions, **kwargs) -> list[float]:
    """Share of the query's content words that the completion uses (conversational prompts and completions)."""
    scores = []
    for prompt, completion in zip(prompts, completions, strict=True):
        wanted = content_words(prompt[-1]["content"])
        used = content_words(completion[-1]["content"])
        scores.append(len(wanted & used) / max(1, len(wanted)))
    return scores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--queries", type=int, default=4, help="prompts per step")
    parser.add_argument("--generations", type=int, default=4, help="completions per prompt")
    parser.add_argument("--steps", type=int, default=2)
    args = parser.parse_args()

    model, tokenizer = load_smollm2()
    queries = load_queries("builtin:dialogue")[: args.queries * args.steps]
    dataset = Dataset.from_dict({"prompt": [[{"role": "user", "content": q}] for q in queries]})
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as output_dir:
        trainer = SharedPromptGRPOTrainer(
            model=model,
            reward_funcs=on_topic,
            args=GRPOConfig(
                output_dir=output_dir,
                per_device_train_batch_size=args.queries * args.generations,
                num_generations=args.generations,
                max_completion_length=24,
                beta=0.04,  # a KL term: reference log-probs through the shared forward too
                max_steps=args.steps,
                learning_rate=1e-5,
                logging_steps=1,
                bf16=False,
                gradient_checkpointing=False,
                use_cpu=True,
                report_to=[],
                save_strategy="no",
            ),
            train_dataset=dataset,
            processing_class=tokenizer,
        )
        trainer.train()
    for entry in trainer.state.log_history:
        if "loss" in entry:
            print(
                f"step {entry['step']}: loss {entry['loss']:.4f}  reward {entry['reward']:.3f}  "
                f"kl {entry['kl']:.5f}  entropy {entry['entropy']:.3f}"
            )
    print(f"{args.steps} GRPO steps in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
