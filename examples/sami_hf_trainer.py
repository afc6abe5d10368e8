"""SAMI in a plain transformers.Trainer: sample responses under two constitutions, then train with SAMITrainer.

    python examples/sami_hf_trainer.py [--model smollm2|tiny-random|<path>] [--queries 8] [--steps 2]

Each training item is one query with N constitutions and the N responses written under them; SAMITrainer's
compute_loss is the fused pair engine (every prompt encoded once, only response positions reach the output head).
"""

import argparse
import tempfile

from transformers import AutoModelForCausalLM, AutoTokenizer, TrainingArguments

from sami_kernels.engine.generation import GenerationConfig, HFGenerator, shared_prefix_prompts
from sami_kernels.engine.models import resolve_model_path
from sami_kernels.integrations.hf_trainer import SAMITrainer
from sami_kernels.recipes.data import load_queries
from sami_kernels.recipes.sami.config import TEMPLATES
from sami_kernels.recipes.sami.constitutions import load_principle_set


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--queries", type=int, default=8)
    parser.add_argument("--steps", type=int, default=2)
    args = parser.parse_args()

    path = resolve_model_path(args.model)
    model, tokenizer = AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path)
    principles = load_principle_set("dialogue")
    positive = principles.positive()
    negative = tuple((name, False) for name, _ in positive)  # not helpful + not harmless
    constitutions = [principles.render(c) for c in (positive, negative)]
    queries = load_queries("builtin:dialogue")[: args.queries]

    generate_template, train_template = TEMPLATES["dialogue"]
    generator = HFGenerator(model, tokenizer, GenerationConfig(max_new_tokens=32))
    responses = [
        generator.generate(*shared_prefix_prompts(generate_template, queries, constitution=c)) for c in constitutions
    ]
    items = [
        {"query": q, "constitutions": constitutions, "responses": [r[k].rstrip() for r in responses]}
        for k, q in enumerate(queries)
        if all(r[k].strip() for r in responses) and responses[0][k] != responses[1][k]
    ]
    print(f"{len(items)} of {len(queries)} queries have two distinct non-empty responses")

    with tempfile.TemporaryDirectory() as output_dir:
        trainer = SAMITrainer(
            model=model,
            args=TrainingArguments(
                output_dir=output_dir,
                per_device_train_batch_size=2,
                gradient_accumulation_steps=2,
                max_steps=args.steps,
                learning_rate=2e-5,
                logging_steps=1,
                report_to=[],
                save_strategy="no",
                use_cpu=True,
            ),
            train_dataset=items,
            processing_class=tokenizer,
            template=train_template,
        )
        trainer.train()
    for entry in trainer.state.log_history:
        if "loss" in entry:
            print(f"step {entry['step']}: SAMI loss {entry['loss']:.4f}")


if __name__ == "__main__":
    main()
