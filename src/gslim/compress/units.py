"""Prunable channel groups ("units"), found from the model's traced graph.

The model is traced with ``torch.fx`` and every tensor's channel dimension is assigned
a *channel space*. Ops that keep channels aligned (BatchNorm, activations, depthwise
convs, pooling, flatten of a 1x1 map, the SE gate's multiply) share their input's space;
a dense conv or a Linear starts a new space. An elementwise ``add`` of two spaces couples
them (a residual stream); a ``mul`` by a per-channel gate joins the gate's producer to
the gated space (squeeze-and-excitation).

Each space then lists who touches it:

* producers: dense convs / Linears whose *output* channels are the space (rows sliced);
* members: BatchNorms and depthwise convs that carry it (per-channel parameters sliced);
* readers: dense convs / Linears whose *input* channels are the space (columns sliced).

A space is a **unit** when all of its channels can be dropped without changing any
tensor shape outside it. It is *internal* (the expanded channels of an inverted
residual, the inner channels of a ResNet block) when it has one dense producer, or
*residual* when several producers are coupled by ``add`` (the width of a stage). The
reader whose output leaves the unit is its *consumer*: the layer the greedy method
re-fits. Readers whose output only comes back to gate the same space (SE's squeeze
conv) are sliced but not re-fitted.

Spaces are left alone, with a reason, when they touch the network input or output, a
grouped (non-depthwise) conv, a concat, a flatten of a spatial map, or any op this
analysis does not understand. Detection is by graph structure, not by class names, so
EfficientNet, MnasNet and RegNet get the same treatment as MobileNet and ResNet.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.fx as fx
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp

# Ops that leave the channel dimension (dim 1) aligned with their first input.
_PASSTHROUGH_MODULES = (
    nn.ReLU,
    nn.ReLU6,
    nn.Hardswish,
    nn.Hardsigmoid,
    nn.SiLU,
    nn.Sigmoid,
    nn.GELU,
    nn.Tanh,
    nn.LeakyReLU,
    nn.PReLU,
    nn.ELU,
    nn.Mish,
    nn.Identity,
    nn.Dropout,
    nn.Dropout2d,
    nn.MaxPool2d,
    nn.AvgPool2d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveMaxPool2d,
)
_PASSTHROUGH_FUNCTIONS = {
    "relu",
    "relu6",
    "hardswish",
    "hardsigmoid",
    "silu",
    "sigmoid",
    "gelu",
    "tanh",
    "leaky_relu",
    "elu",
    "mish",
    "dropout",
    "max_pool2d",
    "avg_pool2d",
    "adaptive_avg_pool2d",
    "adaptive_max_pool2d",
    "stochastic_depth",
    "contiguous",
    "clone",
    "relu_",
    "hardtanh",
    "hardtanh_",
    "sigmoid_",
}


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


class _Spaces:
    """Union-find over channel spaces, with per-space bookkeeping."""

    def __init__(self) -> None:
        self.parent: list[int] = []
        self.width: list[int] = []
        self.info: list[dict] = []

    def new(self, width: int) -> int:
        self.parent.append(len(self.parent))
        self.width.append(width)
        self.info.append(
            {
                "producers": [],
                "gate_producers": [],
                "members": [],
                "readers": [],
                "blocked": [],
                "residual": False,
                "nodes": [],
            }
        )
        return len(self.parent) - 1

    def find(self, s: int) -> int:
        while self.parent[s] != s:
            self.parent[s] = self.parent[self.parent[s]]
            s = self.parent[s]
        return s

    def union(self, a: int, b: int) -> int:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return ra
        self.parent[rb] = ra
        for k, v in self.info[rb].items():
            if isinstance(v, list):
                self.info[ra][k].extend(v)
            else:
                self.info[ra][k] = self.info[ra][k] or v
        return ra

    def get(self, s: int) -> dict:
        return self.info[self.find(s)]


def _channels(node: fx.Node) -> Optional[int]:
    meta = node.meta.get("tensor_meta")
    if meta is None or not hasattr(meta, "shape") or len(meta.shape) < 2:
        return None
    return int(meta.shape[1])


def _shape(node: fx.Node):
    meta = node.meta.get("tensor_meta")
    return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None


def _numel(node: fx.Node) -> int:
    shape = _shape(node)
    n = 1
    for d in shape or ():
        n *= int(d)
    return n


def _fn_name(node: fx.Node) -> str:
    t = node.target
    if node.op == "call_method":
        return str(t)
    return getattr(t, "__name__", str(t))


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
    walk = _ChannelWalk(gm)
    for i, node in enumerate(gm.graph.nodes):
        walk.visit(i, node)
    walk.block_shared_modules()
    return walk.units(include_residual)


class _ChannelWalk:
    """One pass over the traced graph: which channel space each tensor is in, and who
    produces, carries, reads or blocks each space."""

    def __init__(self, gm: fx.GraphModule):
        self.gm = gm
        self.modules = dict(gm.named_modules())
        self.sp = _Spaces()
        self.space_of: dict[str, int] = {}
        self.node_index: dict[str, int] = {}
        self.call_node: dict[str, str] = {}
        self.calls_per_module: dict[str, int] = {}

    def block(self, node: fx.Node, reason: str) -> None:
        for arg in node.all_input_nodes:
            if arg.name in self.space_of:
                self.sp.get(self.space_of[arg.name])["blocked"].append(reason)

    def new_space(
        self, node: fx.Node, width: int, role: Optional[str] = None, what: Optional[str] = None
    ) -> int:
        """A fresh space for ``node``'s output; ``role`` records it (producers, blocked with ``what``)."""
        self.space_of[node.name] = self.sp.new(width)
        if role == "producer":
            self.sp.get(self.space_of[node.name])["producers"].append(node.target)
        elif role == "blocked":
            self.sp.get(self.space_of[node.name])["blocked"].append(what)
        return self.space_of[node.name]

    def visit(self, i: int, node: fx.Node) -> None:
        self.node_index[node.name] = i
        if node.op == "placeholder":
            self.new_space(node, _channels(node) or 0, "blocked", "network input")
        elif node.op == "output":
            self.block(node, "network output")
        elif node.op == "call_module":
            self.visit_module(node)
        elif node.op != "get_attr":
            self.visit_function(node)

    def _first(self, node: fx.Node) -> Optional[int]:
        return (
            self.space_of.get(node.args[0].name) if node.args and isinstance(node.args[0], fx.Node) else None
        )

    def visit_module(self, node: fx.Node) -> None:
        mod, first, sp = self.modules[node.target], self._first(node), self.sp
        self.calls_per_module[node.target] = self.calls_per_module.get(node.target, 0) + 1
        self.call_node[node.target] = node.name
        if isinstance(mod, nn.Conv2d):
            depthwise = mod.groups == mod.in_channels == mod.out_channels and mod.groups > 1
            if depthwise and first is not None:
                sp.get(first)["members"].append(node.target)
                self.space_of[node.name] = first
            elif mod.groups == 1 and first is not None:
                sp.get(first)["readers"].append(node.target)
                self.new_space(node, mod.out_channels, "producer")
            else:
                self.block(node, f"grouped conv {node.target} (removing channels would break its groups)")
                self.new_space(node, mod.out_channels, "blocked", f"output of grouped conv {node.target}")
        elif isinstance(mod, nn.Linear) and first is not None:
            shape = _shape(node.args[0])
            if shape is not None and len(shape) == 2:
                sp.get(first)["readers"].append(node.target)
            else:
                self.block(node, f"Linear {node.target} on a non-flat input")
            self.new_space(node, mod.out_features, "producer")
        elif isinstance(mod, (nn.BatchNorm2d, nn.BatchNorm1d)) and first is not None:
            sp.get(first)["members"].append(node.target)
            self.space_of[node.name] = first
        elif isinstance(mod, _PASSTHROUGH_MODULES) and first is not None:
            self.space_of[node.name] = first
        else:
            self.block(node, f"unsupported layer {type(mod).__name__} ({node.target})")
            c = _channels(node)
            if c is not None:
                self.new_space(node, c, "blocked", f"output of {type(mod).__name__}")

    def visit_function(self, node: fx.Node) -> None:
        name, c, first = _fn_name(node), _channels(node), self._first(node)
        if c is None:  # sizes, shapes and other non-tensor values
            return
        params = [a for a in node.all_input_nodes if a.op == "get_attr" and _numel(a) > 1]
        if params:
            # a per-channel parameter (layer scale, a learned bias map) would need slicing with
            # the channels; without that the slim model could not run, so the space stays whole
            self.block(
                node, f"per-channel parameter {params[0].target} in {name} ({node.name}) is not sliced"
            )
            self.new_space(node, c, "blocked", f"output of {name} with parameter {params[0].target}")
        elif name in _PASSTHROUGH_FUNCTIONS and first is not None:
            self.space_of[node.name] = first
        elif name in ("flatten", "view", "reshape", "mean", "squeeze") and first is not None:
            self.visit_reshape(node, name, c, first)
        elif not (self.visit_add(node, name, c) or self.visit_mul(node, name, c)):
            self.block(node, f"unsupported operation {name} ({node.name})")
            self.new_space(node, c, "blocked", f"output of {name}")

    def visit_reshape(self, node: fx.Node, name: str, c: int, first: int) -> None:
        in_shape, out_shape = _shape(node.args[0]), _shape(node)
        spatial = 1
        for d in (in_shape or ())[2:]:
            spatial *= d
        if in_shape and out_shape and spatial == 1 and out_shape[:2] == in_shape[:2]:
            self.space_of[node.name] = first
        elif name == "mean" and in_shape and out_shape and out_shape[:2] == in_shape[:2]:
            self.space_of[node.name] = first  # global average pooling written as x.mean([2, 3])
        else:
            self.block(node, f"{name} mixes channels with spatial positions ({node.name})")
            self.new_space(node, c, "blocked", f"output of {name}")

    def _inputs(self, node: fx.Node) -> list[fx.Node]:
        return [a for a in node.all_input_nodes if a.name in self.space_of]

    def visit_add(self, node: fx.Node, name: str, c: int) -> bool:
        if not (
            node.target in (operator.add, torch.add, operator.iadd, "add", "add_") or name in ("add", "iadd")
        ):
            return False
        ins = self._inputs(node)
        tensor_ins = [self.space_of[a.name] for a in ins if _channels(a) == c]
        if len(tensor_ins) == 2:  # a residual join: both sides are one space
            root = self.sp.union(*tensor_ins)
            self.sp.get(root)["residual"] = True
            self.space_of[node.name] = root
            return True
        if len(tensor_ins) == 1 and len(ins) == 1:
            self.space_of[node.name] = tensor_ins[0]  # x + scalar
            return True
        return False

    def visit_mul(self, node: fx.Node, name: str, c: int) -> bool:
        if not (
            node.target in (operator.mul, torch.mul, operator.imul, "mul", "mul_") or name in ("mul", "imul")
        ):
            return False
        ins, sp = self._inputs(node), self.sp
        full = [a for a in ins if _shape(a) == _shape(node)]
        gates = [a for a in ins if a not in full and _channels(a) == c]
        if len(full) == 1 and len(gates) == 1:
            gate_space = sp.get(self.space_of[gates[0].name])
            # the gate's producers become gate producers of the gated space
            gate_space["gate_producers"].extend(gate_space["producers"])
            gate_space["producers"] = []
            self.space_of[node.name] = sp.union(self.space_of[full[0].name], self.space_of[gates[0].name])
            return True
        if len(full) == 2 or (len(full) == 1 and len(ins) == 1):
            root = self.space_of[full[0].name]
            if len(full) == 2:
                root = sp.union(self.space_of[full[0].name], self.space_of[full[1].name])
            self.space_of[node.name] = root
            return True
        return False

    def block_shared_modules(self) -> None:
        for target, n in self.calls_per_module.items():
            if n > 1:  # a module applied twice would need both call sites to agree
                for s in set(self.space_of.values()):
                    info = self.sp.get(s)
                    if target in info["producers"] + info["readers"] + info["members"]:
                        info["blocked"].append(f"module {target} is called {n} times")

    def units(self, include_residual: bool) -> UnitGraph:
        sp, units, skipped = self.sp, [], []
        all_gates = {g for info in sp.info for g in info["gate_producers"]}
        for r in sorted({sp.find(s) for s in self.space_of.values()}):
            info = sp.info[r]
            producers = _dedupe(info["producers"])
            desc = f"{sp.width[r]} channels produced by {', '.join(producers) or 'the input'}"
            if info["blocked"]:
                skipped.append((desc, info["blocked"][0]))
                continue
            if not producers or not info["readers"]:
                continue
            gate = set(info["gate_producers"])
            readers = _dedupe(info["readers"])
            inner = [rd for rd in readers if _only_feeds(rd, gate, sp, self.space_of, self.call_node)]
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
            units.append(
                Unit(
                    name=producers[0] if not residual else f"stream:{producers[0]}",
                    kind="residual" if residual else "internal",
                    width=sp.width[r],
                    producers=producers,
                    gate_producers=_dedupe(info["gate_producers"]),
                    members=_dedupe(info["members"]),
                    consumers=consumers,
                    inner_readers=inner,
                    order=min(self.node_index[self.call_node[cn]] for cn in consumers),
                )
            )
        units.sort(key=lambda u: u.order)
        return UnitGraph(
            units=units,
            skipped=skipped,
            traced=self.gm,
            node_index=self.node_index,
            consumer_node=self.call_node,
        )


def _only_feeds(
    reader: str, gate: set[str], sp: _Spaces, space_of: dict[str, int], call_node: dict[str, str]
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


def layer_roles(units: list[Unit]) -> tuple[dict[str, str], dict[str, str], dict[str, str]]:
    """module name -> unit name for the layers that read, write (produce or gate) and carry
    (batchnorm, depthwise) each unit's channels: what a cost model needs to price widths."""
    reads, writes, carries = {}, {}, {}
    for u in units:
        for m in u.readers:
            reads[m] = u.name
        for m in u.producers + u.gate_producers:
            writes[m] = u.name
        for m in u.members:
            carries[m] = u.name
    return reads, writes, carries


def shaped(graph: UnitGraph, input_size: int) -> fx.GraphModule:
    """The traced graph with every node's tensor shape at batch 1 and ``input_size`` (ShapeProp)."""
    from torch.fx.passes.shape_prop import ShapeProp

    gm = graph.traced
    device = next(gm.parameters()).device
    with torch.no_grad():
        ShapeProp(gm).propagate(torch.zeros(1, 3, input_size, input_size, device=device))
    return gm
