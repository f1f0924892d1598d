"""One segment of the greedy walk over the pruned network: its statistics passes and the
activations the next segment reads."""

from __future__ import annotations

import contextlib
import io
import warnings
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
import torch.fx as fx
from torch import nn

from gslim.compress.calibrate import SegmentTail, split_before_node, split_segment
from gslim.compress.fast_passes import channels_selected
from gslim.compress.units import Unit, UnitGraph

# Cached activations at a consumer may take at most this many bytes (else the segment is rerun whole).
RESUME_CACHE_BYTES = 2 << 30
# Images of the first batch that a resumed segment output is checked on.
RESUME_CHECK_IMAGES = 4


class _PassDone(Exception):
    """Raised by a hook once a statistics pass has reached the last reader it needs."""


@dataclass
class _Step:
    """A unit's pass that started at the chain's resume point: where it split, the values it
    kept there (per batch; None when they would not fit), and which of those values its
    consumers read (their index and channel dimension)."""

    unit: Unit
    split: SegmentTail
    live: Optional[list[tuple]]
    consumer_inputs: list[tuple[int, int]]

    def sliced(self, values: tuple, width: int, keep: torch.Tensor) -> tuple:
        out = list(values)
        for i, dim in self.consumer_inputs:
            v = out[i]
            if v.shape[dim] == width and keep.numel() < width:  # captured before the surgery: slice it
                out[i] = channels_selected(v, dim, keep)
        return tuple(out)


@dataclass
class _Gate:
    """An SE unit's cut where its squeeze reads: the first pass's values there (per batch; None
    when they would not fit) and, after the unit's surgery, those values sliced where they
    reproduce the segment (the second pass starts from them)."""

    unit: Unit
    cut: SegmentTail
    live: Optional[list[tuple]] = None
    resumed: Optional[list[tuple]] = None


class SegmentWalk:
    """One segment of the walk: its statistics passes, then the activations the next segment reads.

    When the planning pass kept the original network's targets, the original network does not
    run here at all (``orig_act`` None); else its segment output, the same in every pass, is kept
    from the first pass instead of being computed again.

    The pruned network's segment runs as a chain. A unit's pass starts where the previous unit's
    left off, runs up to the unit's first consumer, keeps the values alive there, and stops once
    its last consumer has read its input (nothing after it is needed for the statistics). After
    the unit's surgery the next unit's pass resumes from those values with the dropped channels
    sliced off (kept channels' values do not change), and after the last unit only the rest of
    the segment runs. So a chain of units inside one segment (a plain conv chain, where each
    consumer produces the next unit: VGG, or MobileNetV2's stem) runs each layer once, not once
    per unit. Before each resumed pass, and at the end, the chain's values for a few images of
    the first batch are run through the rest of the segment and compared with the whole segment
    on them: a graph this does not capture costs time (the pass restarts from the segment's
    input, with a warning), never accuracy.
    """

    def __init__(self, oseg, wseg, orig_act, work_act, units: list[Unit], graph: UnitGraph):
        self.oseg, self.wseg, self.graph = oseg, wseg, graph
        self.orig_act, self.work_act = orig_act, work_act
        self.orig_out: Optional[list[torch.Tensor]] = None
        self.check_x = work_act[0][: min(RESUME_CHECK_IMAGES, work_act[0].shape[0])].clone()
        self.step: Optional[_Step] = None
        self.gate: Optional[_Gate] = None  # the SE unit being selected, if it has one
        self._restart()

    def _restart(self) -> None:
        """The next pass starts from the segment's input (always right; the shortcut's fallback)."""
        self.module: fx.GraphModule = self.wseg
        self.inputs: list[tuple] = [(x,) for x in self.work_act]

    def run_for(self, u: Unit, squeeze: Sequence[str] = ()) -> Callable[[], None]:
        """The statistics pass for ``u``. With ``squeeze`` (the 1x1 convs inside the unit that
        read it: an SE block's squeeze), the unit is selected in two passes, the second after its
        surgery and the squeeze's re-fit; the first keeps the values where the first squeeze
        reads, so the second runs only from there (the gate, not the expansion before it)."""
        first_done = False
        split = self._split_for(u)
        self.gate = self._gate_for(u, squeeze) if split is not None else None
        gate = self.gate.cut if self.gate is not None else None
        last = max(u.consumers, key=self._position)
        last_mod = self.wseg.get_submodule(last)

        def stop(m, args):  # registered after the statistics hooks, so it runs after them
            raise _PassDone

        def run() -> None:
            nonlocal split, first_done
            resumed = None
            if first_done and self.gate is not None and self.gate.resumed is not None:
                resumed, self.gate.resumed = self.gate.resumed, None
                split = split_segment(gate.tail, self._first_consumer(u))
            cut = gate if not first_done and gate is not None else split
            starts = resumed if resumed is not None else self.inputs
            keep_orig = self.orig_out is None and self.orig_act is not None
            outs, live, size = [], [], 0
            handle = last_mod.register_forward_pre_hook(stop)
            try:
                for i, xw in enumerate(self.work_act):
                    if self.orig_act is not None:  # (None: its targets were kept by the planning pass)
                        yo = self.oseg(self.orig_act[i])
                        if keep_orig:
                            outs.append(yo)
                    if cut is not None and size <= RESUME_CACHE_BYTES:
                        values = cut.head(*starts[i])
                        live.append(values)
                        size += sum(
                            v.numel() * v.element_size() for v in values if isinstance(v, torch.Tensor)
                        )
                        _until_done(cut.tail, values)
                    else:
                        _until_done(self.wseg, (xw,))
            finally:
                handle.remove()
            if keep_orig:
                self.orig_out = outs
            kept = live if size <= RESUME_CACHE_BYTES else None
            if cut is gate and gate is not None:
                self.gate.live = kept
            elif split is not None:  # the latest pass is the one after any surgery but the consumer's re-fit
                self.step = _Step(u, split, kept, self._consumer_inputs(u, split))
            first_done = True

        return run

    def unit_sliced(self, u: Unit, width: int, keep: list[int]) -> None:
        """``u`` was cut to ``keep`` of ``width`` channels before its second pass (an SE unit):
        its first pass's values at the squeeze, sliced, are where the second starts, if they
        reproduce the segment on the check images (else it starts from the chain's start).
        Called outside the statistics hooks, which must not see the check images."""
        gate = self.gate
        if gate is None or gate.unit is not u:
            return
        live, gate.live, gate.resumed = gate.live, None, None
        if live is None:
            return
        kept = torch.as_tensor(keep, dtype=torch.long)
        own = [name in u.values for name in gate.cut.live]
        values = [_channels_sliced(v, own, width, kept) for v in live]
        try:
            with contextlib.redirect_stderr(io.StringIO()):  # (FX prints a failing call's code)
                out = gate.cut.tail(*self._few(values[0]))
        except RuntimeError:  # a value the graph's channel spaces missed: shapes that do not match
            return
        if self._agrees(out, warn=False):
            gate.resumed = values

    def _gate_for(self, u: Unit, squeeze: Sequence[str]) -> Optional[_Gate]:
        if not squeeze:
            return None
        cut = split_segment(self.module, min(squeeze, key=self._position))
        return _Gate(u, cut) if cut is not None else None

    def _position(self, reader: str) -> int:
        """Where the layer ``reader`` runs in the traced network."""
        return self.graph.node_index[self.graph.consumer_node[reader]]

    def _first_consumer(self, u: Unit) -> str:
        return min(u.consumers, key=self._position)

    def unit_done(self, u: Unit, width: int, keep: list[int]) -> None:
        step, self.step = self.step, None
        if step is None or step.unit is not u or step.live is None:
            self._restart()
            return
        kept = torch.as_tensor(keep, dtype=torch.long)
        self.module = step.split.tail
        self.inputs = [step.sliced(values, width, kept) for values in step.live]

    def advance(self) -> tuple[Optional[list[torch.Tensor]], list[torch.Tensor]]:
        """The segment's outputs, original (None when the planning pass kept the targets) and
        pruned: the next segment's inputs. This segment's inputs are let go as they are used."""
        orig = self.orig_out
        if self.orig_act is not None:
            acts = self.orig_act
            if orig is None:
                orig = _outputs_releasing(lambda i: self.oseg(acts[i]), len(acts), 0, acts)
            acts[:] = [None] * len(acts)  # (no later pass reads them)
        n = len(self.work_act)
        if self.module is not self.wseg:
            first = self.module(*self.inputs[0])
            if self._agrees(first[: self.check_x.shape[0]]):
                self.work_act[0] = self.inputs[0] = None
                rest = _outputs_releasing(
                    lambda i: self.module(*self.inputs[i]), n, 1, self.work_act, self.inputs
                )
                self.inputs = []
                return orig, [first] + rest
            del first
            self._restart()
        work = _outputs_releasing(lambda i: self.wseg(self.work_act[i]), n, 0, self.work_act, self.inputs)
        self.inputs = []
        return orig, work

    def _split_for(self, u: Unit) -> Optional[SegmentTail]:
        """Where ``u``'s pass stops keeping values, in the module the chain resumes from
        (checked first), or else in the whole segment: before its first consumer; for a unit
        read inside a concatenation (DenseNet's layer outputs, an Inception branch), whose
        consumers' inputs hold other units' channels too, before the first op that mixes its
        values with others (the concatenation), where its own values are still apart. None: no
        such place; the pass runs from the segment's input, and so does the next one."""
        # (here, not in the pass: there the statistics hooks are set and would see the check images)
        if self.module is not self.wseg and not self._agrees(self.module(*self._few(self.inputs[0]))):
            self._restart()
        split = self._split_in(self.module, u)
        if split is None and self.module is not self.wseg:
            self._restart()
            split = self._split_in(self.wseg, u)
        return split

    def _split_in(self, module: fx.GraphModule, u: Unit) -> Optional[SegmentTail]:
        if not u.concat_before:
            return split_segment(module, self._first_consumer(u))
        mixer = next(
            (
                n.name
                for n in module.graph.nodes
                if n.op not in ("placeholder", "output")
                and n.name not in u.values
                and any(a.name in u.values for a in n.all_input_nodes)
            ),
            None,
        )
        return split_before_node(module, mixer) if mixer is not None else None

    def _few(self, values: tuple) -> tuple:
        """The check images' share of one batch's chain values (a tensor whose first dimension is
        not the batch's would be cut wrongly: the check then fails, which costs time, not accuracy)."""
        n = self.work_act[0].shape[0]
        return tuple(
            v[: self.check_x.shape[0]] if isinstance(v, torch.Tensor) and v.dim() and v.shape[0] == n else v
            for v in values
        )

    def _agrees(self, out: torch.Tensor, warn: bool = True) -> bool:
        """Whether the chain's segment output on the check images is the whole segment's."""
        ref = self.wseg(self.check_x)
        if torch.allclose(out, ref, rtol=1e-4, atol=1e-5 * float(ref.abs().max().clamp_min(1e-12))):
            return True
        if warn:
            warnings.warn(
                "greedy: resuming a segment from its consumer did not reproduce the segment's output; "
                "it was recomputed whole (a graph this shortcut does not capture)",
                stacklevel=3,
            )
        return False

    def _consumer_inputs(self, u: Unit, split: SegmentTail) -> list[tuple[int, int]]:
        """The values kept at ``split`` that ``u``'s surgery narrows, with their channel dimension:
        those its consumers read, or for a unit read inside a concatenation (split before the
        concatenation) its own values."""
        if u.concat_before:
            return [(i, 1) for i, name in enumerate(split.live) if name in u.values]
        consumer_args = {  # a Linear reads its channels last: (N, C) or a channels-last map
            n.args[0]: -1 if isinstance(self.wseg.get_submodule(n.target), nn.Linear) else 1
            for n in split.tail.graph.nodes
            if n.op == "call_module" and n.target in u.consumers and isinstance(n.args[0], fx.Node)
        }
        # (the tail's placeholders are the values of split.live, in order)
        placeholders = [n for n in split.tail.graph.nodes if n.op == "placeholder"]
        return [(i, consumer_args[p]) for i, p in enumerate(placeholders) if p in consumer_args]


def _channels_sliced(values: tuple, own: list[bool], width: int, keep: torch.Tensor) -> tuple:
    """The tensors of ``values`` that carry the unit's channels (``own``, from the graph: at an
    SE unit's squeeze the pooled vector and the map the gate scales, not a shortcut's input that
    may be as wide) cut to ``keep`` along their channel dimension (1). The width is checked too:
    a value the graph places wrongly fails the check that follows, which sends the pass back to
    the chain's start (time, not accuracy)."""
    return tuple(
        channels_selected(v, 1, keep)
        if mine
        and isinstance(v, torch.Tensor)
        and v.dim() >= 2
        and v.shape[1] == width
        and keep.numel() < width
        else v
        for v, mine in zip(values, own)
    )


def _outputs_releasing(run: Callable[[int], torch.Tensor], n: int, start: int, *sources: list) -> list:
    """``run(i)`` for the batches ``start`` to ``n - 1``, each batch's entry of every list in
    ``sources`` let go as soon as its output exists: the walk holds every image's activations at
    a cut, and it held a segment's input and output whole at once (ResNet-50, 224 px, 256 images:
    the in-use heap's peak 3.13 GB, 2.60 GB letting go)."""
    outs = []
    for i in range(start, n):
        outs.append(run(i))
        for values in sources:
            values[i] = None
    return outs


def _until_done(module: nn.Module, args: tuple) -> None:
    try:
        module(*args)
    except _PassDone:
        pass
