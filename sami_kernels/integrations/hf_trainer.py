"""SAMI inside an existing transformers training setup: a Trainer whose compute_loss is the fused pair engine.

    trainer = SAMITrainer(model=model, args=TrainingArguments(...), train_dataset=records, processing_class=tokenizer)
    trainer.train()

Each dataset item is one query: {"query": str, "constitutions": [N str], "responses": [N str]}, responses[j]
written under constitutions[j]. A batch of B items is B independent N x N InfoNCE blocks; the loss is their mean,
so Trainer's gradient accumulation (it divides each micro-batch loss by the number of accumulation steps) gives the
mean over all accumulated queries.
"""

from __future__ import annotations

import transformers
from torch.nn.parallel import DistributedDataParallel

from ..engine.pairs import DEFAULT_TEMPLATE, PairBatch, sami_step_loss


class SAMICollator:
    """Items {query, constitutions, responses} -> {"pair_batch": PairBatch}."""

    def __init__(self, tokenizer, template: str = DEFAULT_TEMPLATE):
        self.tokenizer, self.template = tokenizer, template

    def __call__(self, items: list[dict]) -> dict:
        return {
            "pair_batch": PairBatch.from_texts(
                self.tokenizer,
                [item["query"] for item in items],
                [list(item["constitutions"]) for item in items],
                [list(item["responses"]) for item in items],
                template=self.template,
            )
        }


class SAMITrainer(transformers.Trainer):
    """transformers.Trainer with SAMI's loss. direction: "both" | "row" | "col"; pair_options go to
    sami_step_loss (prefix_sharing, attn, backend)."""

    def __init__(self, *args, direction: str = "both", template: str = DEFAULT_TEMPLATE, pair_options=None, **kwargs):
        tokenizer = kwargs.get("processing_class")
        if kwargs.get("data_collator") is None:
            if tokenizer is None:
                raise ValueError("SAMITrainer needs processing_class=tokenizer (or a data_collator of PairBatches)")
            kwargs["data_collator"] = SAMICollator(tokenizer, template)
        super().__init__(*args, **kwargs)
        self.args.remove_unused_columns = False  # items are text records, not model inputs
        self.direction, self.pair_options = direction, dict(pair_options or {})

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if isinstance(model, DistributedDataParallel):
            raise NotImplementedError(
                "SAMITrainer calls the decoder directly, which DistributedDataParallel would not synchronise; for "
                "multi-process SAMI use `sami-kernels sami` under torchrun (it wraps the pair engine in DDP)"
            )
        loss, M = sami_step_loss(model, inputs["pair_batch"], direction=self.direction, **self.pair_options)
        return (loss, {"M": M}) if return_outputs else loss
