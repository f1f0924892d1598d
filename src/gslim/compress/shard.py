"""Channel selection across torchrun ranks: each rank runs a shard of the calibration batches.

What selection reads from the data is sums (the Grams G = X^T X, B = X^T Y, ||Y||^2 and row
counts of every consumer, and the BatchNorm sums of the re-calibration), so each rank sums its
own batches and the sums are combined across ranks before anything is chosen; every rank then
holds the same statistics, makes the same choices (rank 0's are broadcast, so a rounding
difference cannot split them) and applies the same surgery. Rows are sampled with a generator
seeded per (accumulator, global batch index), so which rows a batch contributes does not depend
on which rank runs it, and the totals do not depend on the order of the batches (float32 Gram
products summed in float64; the rounded float64 sums through :class:`ExactSum`): the selection
equals a single process's on the same images.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, TypeVar

import torch

from gslim.errors import GslimError
from gslim.train.distributed import DistInfo

T = TypeVar("T")


@dataclass
class Shard:
    """This process's part of the calibration set (the whole of it without torchrun)."""

    info: DistInfo = field(default_factory=DistInfo)
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))  # where collectives run

    @property
    def enabled(self) -> bool:
        return self.info.enabled

    def mine(self, batches: list[T]) -> list[T]:
        """Round robin: rank r runs batches r, r + world, ... (:meth:`global_index` maps back)."""
        if not self.enabled:
            return batches
        if len(batches) < self.info.world_size:
            raise GslimError(
                f"{len(batches)} calibration batches cannot be shared by {self.info.world_size} ranks: "
                "raise data.calib_images or lower data.batch_size"
            )
        return batches[self.info.rank :: self.info.world_size]

    def global_index(self, ordinal: int) -> int:
        """The index in the whole calibration set of this rank's ``ordinal``-th batch."""
        return ordinal * self.info.world_size + self.info.rank

    def images(self, batches: list[torch.Tensor]) -> int:
        """Images in the whole calibration set (this rank holds ``batches``)."""
        return int(self.sum_numbers([float(sum(b.shape[0] for b in batches))])[0])

    def sum_(self, t: torch.Tensor) -> torch.Tensor:
        """All-reduce (sum) in place; float64 tensors stay float64."""
        if self.enabled:
            import torch.distributed as dist

            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t

    def exact_sum_(self, total: "ExactSum") -> None:
        """Sum an :class:`ExactSum` across ranks, in place, to the same rounded value as one process
        adding every term: the ``hi`` parts are gathered and added in rank order with TwoSum (an
        all-reduce would round them in the order of its ring), the ``lo`` parts, 2^-53 smaller, are
        all-reduced. Every rank must have added a term (:meth:`mine` gives each rank a batch)."""
        if not self.enabled:
            return
        import torch.distributed as dist

        parts = [torch.empty_like(total.hi) for _ in range(self.info.world_size)]
        dist.all_gather(parts, total.hi.contiguous())
        dist.all_reduce(total.lo, op=dist.ReduceOp.SUM)
        lo = total.lo
        total.hi, total.lo = parts[0].clone(), torch.zeros_like(lo)
        for part in parts[1:]:
            total.add(part)
        total.lo += lo

    def sum_numbers(self, values: list[float]) -> list[float]:
        if not self.enabled:
            return values
        return self.sum_(torch.tensor(values, dtype=torch.float64, device=self.device)).tolist()

    def from_rank0(self, values: list[int]) -> list[int]:
        """Rank 0's list of ints on every rank (the same length everywhere)."""
        if not self.enabled:
            return values
        import torch.distributed as dist

        t = torch.tensor(values, dtype=torch.int64, device=self.device)
        dist.broadcast(t, src=0)
        return t.tolist()


class ExactSum:
    """A float64 sum kept to twice float64 precision (``hi + lo``, Knuth's TwoSum): the rounded
    total is the same in whatever order the terms come, but for totals within 2^-100 of a
    rounding boundary."""

    def __init__(self) -> None:
        self.hi: Optional[torch.Tensor] = None
        self.lo: Optional[torch.Tensor] = None

    def add(self, x: torch.Tensor) -> None:
        x = x.double()
        if self.hi is None:
            self.hi, self.lo = x.clone(), torch.zeros_like(x)
            return
        total = self.hi + x
        back = total - self.hi
        self.lo += (self.hi - (total - back)) + (x - back)
        self.hi = total

    def value(self) -> torch.Tensor:
        return self.hi + self.lo

    def __float__(self) -> float:
        return 0.0 if self.hi is None else float(self.value())


SINGLE = Shard()
