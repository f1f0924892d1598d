"""One segment of the greedy walk over the pruned network: its statistics passes and the
activations the next segment reads."""

from __future__ import annotations

import warnings
from typing import Callable, Optional

import torch
import torch.fx as fx
from torch import nn

from gslim.compress.calibrate import split_segment
from gslim.compress.units import Unit, UnitGraph

# Cached activations at a consumer may take at most this many bytes (else the segment is rerun whole).
RESUME_CACHE_BYTES = 2 << 30
# Images of the first batch that a resumed segment output is checked on.
RESUME_CHECK_IMAGES = 4


class SegmentWalk:
    """One segment of the walk: its statistics passes, then the activations the next segment reads.

    When the planning pass kept the original network's targets, the original network does not
    run here at all (``orig_act`` None); else its segment output, the same in every pass, is kept
    from the first pass instead of being computed again. The pruned network's segment is split before
    the first consumer of its last unit: that unit's passes keep the values alive there, and
    after its surgery only the tail (the consumer onwards) runs again, on those values with the
    dropped channels sliced off (kept channels' values do not change). The first images are also
    recomputed whole and compared, so a graph this does not capture costs time, never accuracy.
    """

    def __init__(self, oseg, wseg, orig_act, work_act, units: list[Unit], graph: UnitGraph):
        self.oseg, self.wseg = oseg, wseg
        self.orig_act, self.work_act = orig_act, work_act
        self.orig_out: Optional[list[torch.Tensor]] = None
        self.last = units[-1] if units else None
        self.split = None
        self.live: Optional[list[tuple]] = None
        self.keep: Optional[tuple[int, torch.Tensor]] = None  # the last unit's (width before, kept)
        # live values read by its consumers (in its channel space), with their channel dimension
        self.consumer_inputs: list[tuple[int, int]] = []
        if self.last is not None and not self.last.concat_before:
            # (a unit read inside a concatenation: its consumers' inputs hold other units' channels)
            first = min(self.last.consumers, key=lambda c: graph.node_index[graph.consumer_node[c]])
            self.split = split_segment(wseg, first)
        if self.split is not None:
            mods = dict(wseg.named_modules())
            consumer_args = {  # a Linear reads its channels last: (N, C) or a channels-last map
                n.args[0].name: -1 if isinstance(mods.get(n.target), nn.Linear) else 1
                for n in wseg.graph.nodes
                if n.op == "call_module"
                and n.target in self.last.consumers
                and isinstance(n.args[0], fx.Node)
            }
            self.consumer_inputs = [
                (i, consumer_args[name]) for i, name in enumerate(self.split.live) if name in consumer_args
            ]

    def run_for(self, u: Unit) -> Callable[[], None]:
        capture = u is self.last and self.split is not None

        def run() -> None:
            keep_orig = self.orig_out is None and self.orig_act is not None
            outs, live, size = [], [], 0
            for i, xw in enumerate(self.work_act):
                if self.orig_act is not None:  # (None: its targets were kept by the planning pass)
                    yo = self.oseg(self.orig_act[i])
                    if keep_orig:
                        outs.append(yo)
                if capture and size <= RESUME_CACHE_BYTES:
                    values = self.split.head(xw)
                    self.split.tail(*values)
                    live.append(values)
                    size += sum(v.numel() * v.element_size() for v in values if isinstance(v, torch.Tensor))
                else:
                    self.wseg(xw)
            if keep_orig:
                self.orig_out = outs
            if capture:  # the latest pass is the one after any surgery but the consumer's re-fit
                self.live = live if size <= RESUME_CACHE_BYTES else None

        return run

    def unit_done(self, u: Unit, width: int, keep: list[int]) -> None:
        if u is self.last and self.live is not None:
            self.keep = (width, torch.as_tensor(keep, dtype=torch.long))

    def advance(self) -> tuple[Optional[list[torch.Tensor]], list[torch.Tensor]]:
        orig = self.orig_out
        if orig is None and self.orig_act is not None:
            orig = [self.oseg(x) for x in self.orig_act]
        if self.live is None or self.keep is None:
            return orig, [self.wseg(x) for x in self.work_act]
        width, keep = self.keep
        work = [self.split.tail(*self._sliced(values, width, keep)) for values in self.live]
        self.live = None
        # a few images of the first batch suffice (eval mode: every image is computed alone),
        # where the whole batch cost one more pass of the segment when it was the only one
        few = min(RESUME_CHECK_IMAGES, self.work_act[0].shape[0])
        check = self.wseg(self.work_act[0][:few])
        if not torch.allclose(
            work[0][:few], check, rtol=1e-4, atol=1e-5 * float(check.abs().max().clamp_min(1e-12))
        ):
            warnings.warn(
                "greedy: resuming a segment from its consumer did not reproduce the segment's output; "
                "it was recomputed whole (a graph this shortcut does not capture)",
                stacklevel=2,
            )
            return orig, [self.wseg(x) for x in self.work_act]
        return orig, work

    def _sliced(self, values: tuple, width: int, keep: torch.Tensor) -> tuple:
        out = list(values)
        for i, dim in self.consumer_inputs:
            v = out[i]
            if v.shape[dim] == width and keep.numel() < width:  # captured before the surgery: slice it
                out[i] = v.index_select(dim, keep.to(v.device))
        return tuple(out)
