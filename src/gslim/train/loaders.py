"""The loaders of a training run: the sharded, reseedable training loader and the
validation loader, and batch iteration that keeps augmentation single-threaded."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Subset
from torch.utils.data.distributed import DistributedSampler

from gslim.recipe import DataConfig
from gslim.train.distributed import DistInfo


def train_loader(
    ds: Dataset, batch_size: int, sampler: DistributedSampler, workers: int, device: torch.device
) -> DataLoader:
    from gslim.data import TensorImageDataset

    in_memory = isinstance(ds, TensorImageDataset) or (
        isinstance(ds, Subset) and isinstance(ds.dataset, TensorImageDataset)
    )
    nw = 0 if in_memory else workers
    # drop_last keeps every step at full batch (and BN away from batches of one) when possible.
    drop_last = len(sampler) >= batch_size
    # Workers are not persistent: each epoch's workers get seeds from the re-seeded generator below.
    return DataLoader(
        ds,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=nw,
        drop_last=drop_last,
        generator=torch.Generator(),
        pin_memory=device.type == "cuda",
        persistent_workers=False,
    )


def iterate_batches(loader: DataLoader) -> Iterator[Any]:
    """Iterate ``loader``; batches assembled in this process are built with one intra-op thread.

    Per-image augmentation is a stream of tiny tensor ops: with several OpenMP threads, and
    worse on a busy machine, thread wake-ups cost 100x the work (measured: 4 ms vs 0.4-1 s per
    batch of 128 on 2 loaded cores). The model's own ops keep all threads.
    """
    it = iter(loader)
    in_process = loader.num_workers == 0
    while True:
        threads = torch.get_num_threads() if in_process else 1
        if threads > 1:
            torch.set_num_threads(1)
        try:
            batch = next(it)
        except StopIteration:
            return
        finally:
            if threads > 1:
                torch.set_num_threads(threads)
        yield batch


def val_loader(ds: Dataset, data: DataConfig, info: DistInfo) -> DataLoader:
    from gslim.data import make_loader

    if info.enabled:  # disjoint shards, no padding: sums add up to the exact full-set numbers
        ds = Subset(ds, list(range(info.rank, len(ds), info.world_size)))
    return make_loader(ds, eval_batch_size(data), shuffle=False, workers=data.workers)


def eval_batch_size(data: DataConfig) -> int:
    return data.eval_batch_size or data.batch_size * 2
