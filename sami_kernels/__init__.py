"""sami-kernels: fused log-prob and InfoNCE kernels for SAMI and SELF-ALIGN principle-driven self-alignment."""

from . import backends, reference
from .ops.infonce import infonce_loss
from .ops.linear_logprobs import LinearLogprobs, linear_logprobs
from .ops.sequence import SAMILoss, sami_loss, sequence_logprobs
from .pairs import PairBatch, pair_logprobs, sami_step_loss

__version__ = "0.1.0"
__all__ = [
    "LinearLogprobs",
    "PairBatch",
    "SAMILoss",
    "backends",
    "infonce_loss",
    "linear_logprobs",
    "pair_logprobs",
    "reference",
    "sami_loss",
    "sami_step_loss",
    "sequence_logprobs",
]
