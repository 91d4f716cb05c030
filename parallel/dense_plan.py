"""What a model declares about its dense side, and what adsfm.parallel.shard applies, knowing no model:

- `tensor_parallel`: module paths under `model.dense` and how each splits over the mesh's "tp" dimension
  (DTensor styles; e.g. a Megatron pair: column-wise then row-wise, one all-reduce at the end);
- `fsdp_units`: module paths under `model.dense` that FSDP2 shards as units before the dense root;
- `head_shared`: parameter names under `model.dense` that every attention head uses: under tensor
  parallelism each rank's gradient covers only its own heads, so the gradients are summed over "tp".

Order of application (torchtitan's): tensor parallel, then FSDP over "dp".
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

from torch import nn


@dataclass(frozen=True)
class DensePlan:
    tensor_parallel: dict[str, Any] = field(default_factory=dict)
    fsdp_units: list[str] = field(default_factory=list)
    head_shared: list[str] = field(default_factory=list)


class SparseDenseModel(Protocol):
    """What the parallelize function needs of a model: a sparse arch, a dense arch and its declared plan."""

    @property
    def sparse(self) -> nn.Module: ...

    @property
    def dense(self) -> nn.Module: ...

    def parallel_plan(self, tp: int) -> DensePlan:
        """The dense side's plan for a tensor-parallel degree `tp`; raises ValueError (naming the config
        fields and the arithmetic) when the model cannot split that way."""
        ...

    def named_parameters(self, prefix: str = "", recurse: bool = True, remove_duplicate: bool = True) -> Any: ...
