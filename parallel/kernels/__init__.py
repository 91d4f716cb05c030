"""GPU kernels for adsfm models, each beside the PyTorch reference that defines its semantics.

Importing this package never imports Triton: the Triton implementations load on first use.
"""

from adsfm.parallel.kernels.hstu_attention import (
    ERROR_BOUNDS,
    hstu_attention,
    hstu_attention_reference,
    position_bucket,
    time_bucket,
    triton_available,
)

__all__ = [
    "ERROR_BOUNDS",
    "hstu_attention",
    "hstu_attention_reference",
    "position_bucket",
    "time_bucket",
    "triton_available",
]
