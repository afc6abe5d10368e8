"""DPO with TRL 1.16 on the embedded SmolLM2-135M-Instruct, chosen and rejected scored with one decoder pass of their
shared prompt (SharedPromptDPOTrainer).

    python examples/trl_dpo.py [--pairs 8] [--steps 3]

The preference pairs are the built-in helpful/honest/harmless multiple-choice items (SELF-ALIGN's mc_hhh.jsonl):
a query, two answers, and which is better.
"""

import argparse
import tempfile
import time

from datasets import Dataset
from trl import DPOConfig

from sami_kernels.engine.models import load_smollm2
from sami_kernels.integrations.trl import SharedPromptDPOTrainer
from sami_kernels.recipes.data import read_jsonl
from sami_kernels.recipes.self_align.config import DATA


def preference_pairs(limit: int) -> Dataset:
    """{prompt, chosen, rejected} in TRL's conversational form, from the built-in mc_hhh items."""
    rows = {"prompt": [], "chosen": [], "rejected": []}
    for item in read_jsonl(DATA / "mc_hhh.jsonl")[:limit]:
        worse = "b" if item["better"] == "a" else "a"
        rows["prompt"].append([{"role": "user", "content": item["query"]}])
        rows["chosen"].append([{"role": "assistant", "content": item[item["better"]]}])
        rows["rejected"].append([{"role": "assistant", "content": item[worse]}])
    return Dataset.from_dict(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=8)
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()

    model, tokenizer = load_smollm2()
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as output_dir:
        trainer = SharedPromptDPOTrainer(
            model=model,
            args=DPOConfig(
                output_dir=output_dir,
                per_device_train_batch_size=4,
                max_steps=args.steps,
                learning_rate=5e-6,
                logging_steps=1,
                bf16=False,
                gradient_checkpointing=False,
                use_cpu=True,
                report_to=[],
                save_strategy="no",
            ),
            train_dataset=preference_pairs(args.pairs),
            processing_class=tokenizer,
        )
        trainer.train()
    for entry in trainer.state.log_history:
        if "loss" in entry:
            print(
                f"step {entry['step']}: loss {entry['loss']:.4f}  reward margin {entry['rewards/margins']:.4f}  "
                f"accuracy {entry['rewards/accuracies']:.2f}"
            )
    print(f"{args.steps} DPO steps in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
