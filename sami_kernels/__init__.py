"""sami-kernels: fused log-prob and InfoNCE kernels for SAMI and SELF-ALIGN principle-driven self-alignment.

Layers, each importing only those below it (import-linter checks it, `make lint`):

    cli           the `sami-kernels` command
    recipes       the SAMI and SELF-ALIGN loops     |  integrations   trainers of other libraries (SAMITrainer)
    engine        scoring and generating with a Hugging Face causal LM (pair engine, packed scoring, generator)
    kernels       the fused ops and their backends: torch (+ triton, the C++/CUDA extensions) only
"""

from .engine.groups import GroupLogprobs, group_logprobs
from .engine.head import TOKEN_STATS
from .engine.pairs import PairBatch, pair_logprobs, sami_step_loss
from .kernels import backends, reference
from .kernels.ops.infonce import infonce_loss
from .kernels.ops.linear_logprobs import LinearLogprobs, linear_logprobs
from .kernels.ops.sequence import SAMILoss, sami_loss, sequence_logprobs

__version__ = "0.1.0"
__all__ = [
    "TOKEN_STATS",
    "GroupLogprobs",
    "LinearLogprobs",
    "PairBatch",
    "SAMILoss",
    "SAMITrainer",
    "backends",
    "group_logprobs",
    "infonce_loss",
    "linear_logprobs",
    "pair_logprobs",
    "reference",
    "sami_loss",
    "sami_step_loss",
    "sequence_logprobs",
]


def __getattr__(name: str):
    if name == "SAMITrainer":  # imported on first use: it pulls in transformers.Trainer
        from .integrations.hf_trainer import SAMITrainer

        return SAMITrainer
    raise AttributeError(f"module 'sami_kernels' has no attribute {name!r}")
