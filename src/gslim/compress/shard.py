"""Channel selection across torchrun ranks: each rank runs a shard of the calibration batches.

What selection reads from the data is sums (the Grams G = X^T X, B = X^T Y, ||Y||^2 and row
counts of every consumer, and the BatchNorm sums of the re-calibration), so each rank sums its
own batches and the sums are all-reduced in float64 before anything is chosen; every rank then
holds the same statistics, makes the same choices (rank 0's are broadcast, so a rounding
difference cannot split them) and applies the same surgery. Rows are sampled with a generator
seeded per (accumulator, global batch index), so which rows a batch contributes does not depend
on which rank runs it: the selection equals a single process's on the same images, up to the
order of float64 additions.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TypeVar

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

    def exact_sum_(self, total) -> None:
        """Sum a :class:`~gslim.compress.calibrate.ExactSum` across ranks, in place, to the same
        rounded value as one process adding every term: the ``hi`` parts are gathered and added in
        rank order with TwoSum (an all-reduce would round them in the order of its ring), the
        ``lo`` parts, 2^-53 smaller, are all-reduced."""
        if not self.enabled:
            return
        import torch.distributed as dist

        hi = total.hi if total.hi is not None else torch.zeros((), device=self.device)  # (mine(): never)
        parts = [torch.empty_like(hi) for _ in range(self.info.world_size)]
        dist.all_gather(parts, hi.contiguous())
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


SINGLE = Shard()
