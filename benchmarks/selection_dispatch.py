"""What a greedy selection asks of a GPU's host: tensor ops dispatched and values read back.

    python benchmarks/selection_dispatch.py [--archs mobilenet_v2,resnet18] [--images 128] [--size 64]

On a GPU the selection's loops are many small kernels: each op costs a launch on the host
(microseconds, whatever its size) and each host stall waits for the device to drain: a read of a
value back to the host (``.item()``, ``int(t)``, ``float(t)``, a linalg error check), a host value
lifted into a tensor (``t[idx] = True`` copies the scalar from the host: one stall per greedy step
until 2026-12-05, found by the H100 device check), a boolean-mask index or ``nonzero`` (the
result's size is read back). This counts both on the CPU, where they can be counted exactly (they
do not depend on the device), during one ``compress_model`` (greedy, 50% MACs, random weights,
Gaussian images), by the gslim function that issued them. Prints the totals and the top issuers.
Not counted (invisible on a CPU): ``.to(device)`` of a host tensor, also a stall on a GPU. Counted
though it is none: a host value lifted into a tensor that stays on the host (shapes in the cost
model) -- the stall count is an upper bound.
"""

from __future__ import annotations

import argparse
import collections
import sys
import time

import torch
import torchvision
from torch.utils._python_dispatch import TorchDispatchMode

STALLS = {
    torch.ops.aten._local_scalar_dense.default,  # a value read back
    torch.ops.aten.lift_fresh.default,  # a host value made a tensor (copied to the device)
    torch.ops.aten.nonzero.default,  # its size is read back
    torch.ops.aten.masked_select.default,
}


def is_stall(func, args) -> bool:
    """Whether this op waits for the device on a GPU (see the module's docstring)."""
    if func in STALLS:
        return True
    if func is torch.ops.aten.index.Tensor:  # a boolean mask among the indices: a nonzero inside
        return any(i is not None and i.dtype in (torch.bool, torch.uint8) for i in args[1])
    return False


class DispatchCount(TorchDispatchMode):
    """Counts every aten op, and the host reads among them, by the innermost gslim caller."""

    def __init__(self):
        super().__init__()
        self.ops: collections.Counter = collections.Counter()
        self.reads: collections.Counter = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        frame, where = sys._getframe(1), "(outside gslim)"
        while frame is not None:
            name = frame.f_code.co_filename
            if "/gslim/" in name:
                where = f"{name.split('/gslim/')[-1]}:{frame.f_code.co_name}"
                break
            frame = frame.f_back
        self.ops[where] += 1
        if is_stall(func, args):
            self.reads[where] += 1
        return func(*args, **(kwargs or {}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--archs", default="mobilenet_v2,resnet18")
    ap.add_argument("--images", type=int, default=128)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--top", type=int, default=6)
    args = ap.parse_args()
    torch.set_num_threads(1)

    from gslim.compress.select import compress_model
    from gslim.recipe import CompressConfig

    for arch in args.archs.split(","):
        torch.manual_seed(0)
        model = getattr(torchvision.models, arch)(num_classes=1000).eval()
        x = torch.randn(args.images, 3, args.size, args.size)
        t = time.perf_counter()
        with DispatchCount() as count:
            compress_model(model, args.size, x, None, CompressConfig(criterion="greedy", target_macs=0.5))
        seconds = time.perf_counter() - t
        print(f"\n**{arch}** ({args.images} images, {args.size} px; {seconds:.1f} s counted on this CPU)\n")
        print("| issued by | ops | host stalls |")
        print("|---|---:|---:|")
        print(f"| all | {sum(count.ops.values()):,} | {sum(count.reads.values()):,} |")
        top = [w for w, _ in count.ops.most_common(args.top)]
        top += [w for w, _ in count.reads.most_common(args.top) if w not in top]  # the most stalls too
        for where in top:
            print(f"| {where} | {count.ops[where]:,} | {count.reads[where]:,} |")


if __name__ == "__main__":
    main()
