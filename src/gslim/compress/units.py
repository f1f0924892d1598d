"""Prunable channel groups ("units"), found from the model's traced graph.

The model is traced with ``torch.fx`` and every tensor's channel dimension is assigned
a *channel space*. Ops that keep channels aligned (BatchNorm, activations, depthwise
convs, pooling, flatten of a 1x1 map, the SE gate's multiply) share their input's space;
a dense conv or a Linear starts a new space. An elementwise ``add`` of two spaces couples
them (a residual stream); a ``mul`` by a per-channel gate joins the gate's producer to
the gated space (squeeze-and-excitation).

Each space then lists who touches it:

* producers: dense convs / Linears whose *output* channels are the space (rows sliced);
* members: BatchNorms and depthwise or grouped convs that carry it (per-channel parameters
  sliced; a grouped conv's channels are kept or dropped a whole group at a time, the unit's
  ``atom``);
* readers: dense convs / Linears whose *input* channels are the space (columns sliced).

A space is a **unit** when all of its channels can be dropped without changing any
tensor shape outside it. It is *internal* (the expanded channels of an inverted
residual, the inner channels of a ResNet block) when it has one dense producer, or
*residual* when several producers are coupled by ``add`` (the width of a stage). The
reader whose output leaves the unit is its *consumer*: the layer the greedy method
re-fits. Readers whose output only comes back to gate the same space (SE's squeeze
conv) are sliced but not re-fitted.

Between a permute to channels-last and the permute back (ConvNeXt's blocks) the channels
are the last dim and a Linear is a 1x1 conv: its hidden width is a unit like any other.

A concatenation along the channels (DenseNet's dense connections, GoogLeNet's Inception
branches) keeps each input's space: a BatchNorm or conv on the concatenation carries or reads
every input at its column range (``Unit.concat_before``), so each input is a unit of its own.

Spaces are left alone, with a reason, when they touch the network input or output, a
grouped conv that changes the width, a LayerNorm over the channels (it normalises across
them: removing one changes the others), a per-channel parameter such as a layer scale, a
channel split (``chunk``) or shuffle (ShuffleNet: the kept set of a block output would be
dictated by nested split-and-interleave constraints through the stage, not free to choose), a
flatten of a spatial map, or any op this analysis does not understand. Detection is by graph
structure, not by class names, so EfficientNet, MnasNet, RegNet, ResNeXt, ConvNeXt, DenseNet
and GoogLeNet get the same treatment as MobileNet and ResNet.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.fx as fx
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp

from gslim.compress.channel_walk import ChannelWalk, Spaces


@dataclass
class Unit:
    """A prunable channel group and every layer that must be sliced with it."""

    name: str
    kind: str  # "internal" or "residual"
    width: int
    producers: list[str] = field(default_factory=list)  # dense conv/linear: output rows
    gate_producers: list[str] = field(default_factory=list)  # SE excitation conv: output rows
    members: list[str] = field(default_factory=list)  # batchnorm / depthwise conv
    consumers: list[str] = field(default_factory=list)  # dense conv/linear re-fitted on the kept channels
    inner_readers: list[str] = field(default_factory=list)  # SE squeeze conv: columns sliced, not re-fitted
    order: int = 0  # topological position of the (first) consumer: units are processed in this order
    # channels kept or dropped together: a grouped conv that carries the unit (in == out
    # channels, ``groups`` > 1) stays a valid grouped conv only when whole groups go
    atom: int = 1
    # layers that carry or read the unit inside a concatenation -> what precedes it there: a
    # unit's producer (its current output width counts) or a fixed width. The unit's columns
    # start where those end.
    concat_before: dict[str, list] = field(default_factory=dict)
    # the traced graph's values whose channels are this unit's (the ones its surgery narrows)
    values: frozenset = frozenset()

    @property
    def readers(self) -> list[str]:
        return self.consumers + self.inner_readers


@dataclass
class UnitGraph:
    units: list[Unit]
    skipped: list[tuple[str, str]]  # (description of the space, reason it is left alone)
    traced: fx.GraphModule
    node_index: dict[str, int]
    consumer_node: dict[str, str]  # module name -> fx node name of its (single) call


def trace(model: nn.Module, input_size: int) -> fx.GraphModule:
    """Trace in eval mode (stochastic depth and dropout are identities) and annotate shapes."""
    was_training = model.training
    model.eval()
    try:
        gm = fx.symbolic_trace(model)
    finally:
        model.train(was_training)
    gm.eval()
    device = next(model.parameters()).device
    with torch.no_grad():
        ShapeProp(gm).propagate(torch.zeros(2, 3, input_size, input_size, device=device))
    return gm


def find_units(model: nn.Module, input_size: int, include_residual: bool = True) -> UnitGraph:
    """Analyse ``model`` and return its prunable units in processing order."""
    # Shapes are only used to tell a per-channel gate (N, C, 1, 1) from a feature map and a
    # flatten of a 1x1 map from one of a spatial map; trace at >= 96 px so that late feature
    # maps are larger than 1x1 and the two cannot be confused. The graph does not depend on it.
    gm = trace(model, max(input_size, 96))
    walk = ChannelWalk(gm)
    for i, node in enumerate(gm.graph.nodes):
        walk.visit(i, node)
    walk.block_shared_modules()
    return _collect_units(walk, include_residual)


def _collect_units(walk: ChannelWalk, include_residual: bool) -> UnitGraph:
    """The units (and the spaces left alone, with why) of a finished walk."""
    sp, units, skipped = walk.sp, [], []
    all_gates = {g for info in sp.info for g in info["gate_producers"]}
    for layer, segs in walk.views:  # a space twice in one concatenation: two ranges to keep in step
        roots = [sp.find(s) for s in segs]
        for r in {r for r in roots if roots.count(r) > 1}:
            sp.info[r]["blocked"].append(f"{layer} reads it twice through one concatenation")
    by_root: dict[int, Unit] = {}
    values_of: dict[int, set[str]] = {}
    for name, space in walk.space_of.items():
        values_of.setdefault(sp.find(space), set()).add(name)
    for r in sorted({sp.find(s) for s in walk.space_of.values()}):  # (concatenated inputs are among them)
        info = sp.info[r]
        producers = _dedupe(info["producers"])
        desc = f"{sp.width[r]} channels produced by {', '.join(producers) or 'the input'}"
        if info["blocked"]:
            # listed where someone could have removed channels: a layer makes them, or the input
            if producers or info["gate_producers"] or "network input" in info["blocked"]:
                skipped.append((desc, info["blocked"][0]))
            continue
        if not producers or not info["readers"]:
            continue
        gate = set(info["gate_producers"])
        readers = _dedupe(info["readers"])
        inner = [rd for rd in readers if _only_feeds(rd, gate, sp, walk.space_of, walk.call_node)]
        consumers = [rd for rd in readers if rd not in inner]
        if not consumers:
            skipped.append((desc, "no layer outside the block reads it"))
            continue
        if any(rd in all_gates for rd in consumers):
            skipped.append((desc, "squeeze-and-excitation bottleneck (runs at 1x1, negligible cost)"))
            continue
        residual = info["residual"] or len(producers) > 1
        if residual and not include_residual:
            skipped.append((desc, "residual-coupled stage width (enable prune_residual to select it)"))
            continue
        by_root[r] = Unit(
            name=producers[0] if not residual else f"stream:{producers[0]}",
            kind="residual" if residual else "internal",
            width=sp.width[r],
            producers=producers,
            gate_producers=_dedupe(info["gate_producers"]),
            members=_dedupe(info["members"]),
            consumers=consumers,
            inner_readers=inner,
            order=min(walk.node_index[walk.call_node[cn]] for cn in consumers),
            atom=math.lcm(1, *info["atoms"]),
            values=frozenset(values_of.get(r, ())),
        )
    for layer, segs in walk.views:
        roots = [sp.find(s) for s in segs]
        for i, r in enumerate(roots):
            if r in by_root:
                by_root[r].concat_before[layer] = [
                    by_root[q].producers[0] if q in by_root else sp.width[q] for q in roots[:i]
                ]
    units = sorted(by_root.values(), key=lambda u: u.order)
    return UnitGraph(
        units=units,
        skipped=skipped,
        traced=walk.gm,
        node_index=walk.node_index,
        consumer_node=walk.call_node,
    )


def _only_feeds(
    reader: str, gate: set[str], sp: Spaces, space_of: dict[str, int], call_node: dict[str, str]
) -> bool:
    """True when ``reader``'s output space is read only by gate producers (SE squeeze conv)."""
    if not gate:
        return False
    out = space_of.get(call_node.get(reader, ""), None)
    if out is None:
        return False
    readers = set(sp.get(out)["readers"])
    return bool(readers) and readers <= gate


def _dedupe(items: list[str]) -> list[str]:
    seen: dict[str, None] = {}
    for it in items:
        seen.setdefault(it, None)
    return list(seen)


def layer_roles(units: list[Unit]) -> tuple[dict[str, list[str]], dict[str, str], dict[str, list[str]]]:
    """What a cost model needs to price widths: module name -> the units whose channels it reads
    (several for a layer on a concatenation), writes (produces or gates: one) and carries
    (batchnorm, depthwise: several on a concatenation)."""
    reads: dict[str, list[str]] = {}
    writes: dict[str, str] = {}
    carries: dict[str, list[str]] = {}
    for u in units:
        for m in u.readers:
            reads.setdefault(m, []).append(u.name)
        for m in u.producers + u.gate_producers:
            writes[m] = u.name
        for m in u.members:
            carries.setdefault(m, []).append(u.name)
    return reads, writes, carries


def shaped(graph: UnitGraph, input_size: int) -> fx.GraphModule:
    """The traced graph with every node's tensor shape at batch 1 and ``input_size`` (ShapeProp)."""
    from torch.fx.passes.shape_prop import ShapeProp

    gm = graph.traced
    device = next(gm.parameters()).device
    with torch.no_grad():
        ShapeProp(gm).propagate(torch.zeros(1, 3, input_size, input_size, device=device))
    return gm
