"""sami-kernels: fused log-prob and InfoNCE kernels for SAMI and SELF-ALIGN principle-driven self-alignment."""

from . import backends, reference
from .ops.infonce import infonce_loss
from .ops.linear_logprobs import LinearLogprobs, linear_logprobs
from .ops.sequence import SAMILoss, sami_loss, sequence_logprobs

__version__ = "0.1.0"
__all__ = [
    "LinearLogprobs",
    "SAMILoss",
    "backends",
    "infonce_loss",
    "linear_logprobs",
    "reference",
    "sami_loss",
    "sequence_logprobs",
]
