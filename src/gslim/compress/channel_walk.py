"""The walk behind :func:`gslim.compress.units.find_units`: one pass over the traced graph that
puts every tensor's channels in a *channel space* (union-find) and records, per space, who
produces, carries, reads or blocks it. :mod:`gslim.compress.units` turns the spaces into units.

A tensor's channels are dim 1, or the last dim between a permute to channels-last and the
permute back (ConvNeXt's blocks, whose Linears then act as 1x1 convs on every position).

A concatenation along the channels (DenseNet, GoogLeNet's Inception blocks) is not a space of
its own: it is the ordered list of its inputs' spaces (*segments*). A BatchNorm or a dense
conv/Linear applied to it carries or reads every segment, at the column range where that
segment sits (``views``), so slicing one input slices the matching range of each reader.
"""

from __future__ import annotations

import math
import operator
from typing import Optional

import torch
import torch.fx as fx
from torch import nn

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


class Spaces:
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
                "atoms": [],
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


def _channels(node: fx.Node, dim: int = 1) -> Optional[int]:
    """The size of ``node``'s channel dimension ``dim`` (1, or -1 for a channels-last map)."""
    meta = node.meta.get("tensor_meta")
    if meta is None or not hasattr(meta, "shape") or len(meta.shape) < 2:
        return None
    return int(meta.shape[dim])


# permute dims that move channels last (NCHW -> NHWC, ConvNeXt's blocks) and back
_TO_CHANNELS_LAST, _TO_CHANNELS_FIRST = (0, 2, 3, 1), (0, 3, 1, 2)
_LAYER_NORM = "LayerNorm normalises across the channels (removing one changes the others)"


def _shape(node: fx.Node):
    meta = node.meta.get("tensor_meta")
    return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None


def _numel(node: fx.Node) -> int:
    shape = _shape(node)
    n = 1
    for d in shape or ():
        n *= int(d)
    return n


def _makes_tensors(node: fx.Node) -> bool:
    """True for a value made of several tensors (``chunk``, ``split``) or a tensor of fewer than
    two dims (a reduction over the channels): neither keeps a channel space whole."""
    meta = node.meta.get("tensor_meta")
    if isinstance(meta, (tuple, list)):
        return any(hasattr(m, "shape") for m in meta)
    return hasattr(meta, "shape") and len(meta.shape) < 2


def _regroups_channels(in_shape, out_shape) -> bool:
    """A view (N, C, ...) -> (N, g, C/g, ...): the channels regrouped (ShuffleNet's channel shuffle)."""
    return (
        bool(in_shape and out_shape)
        and len(out_shape) == len(in_shape) + 1
        and out_shape[0] == in_shape[0]
        and out_shape[1] * out_shape[2] == in_shape[1]
        and out_shape[1] > 1
    )


def _fn_name(node: fx.Node) -> str:
    t = node.target
    if node.op == "call_method":
        return str(t)
    return getattr(t, "__name__", str(t))


class ChannelWalk:
    """One pass over the traced graph: which channel space each tensor is in, and who
    produces, carries, reads or blocks each space."""

    def __init__(self, gm: fx.GraphModule):
        self.gm = gm
        self.modules = dict(gm.named_modules())
        self.sp = Spaces()
        self.space_of: dict[str, int] = {}
        self.node_index: dict[str, int] = {}
        self.call_node: dict[str, str] = {}
        self.calls_per_module: dict[str, int] = {}
        # each tensor's channel dimension: 1 (NCHW, the default) or -1 (channels last, between a
        # permute to NHWC and the permute back: the Linears there act as 1x1 convs)
        self.cdim: dict[str, int] = {}
        # a concatenation along the channels: its segments' spaces, in order
        self.segs: dict[str, list[int]] = {}
        # (layer, segments) for each layer that carries or reads a concatenation
        self.views: list[tuple[str, list[int]]] = []

    def block(self, node: fx.Node, reason: str) -> None:
        for arg in node.all_input_nodes:
            if arg.name in self.space_of:
                self.sp.get(self.space_of[arg.name])["blocked"].append(reason)
            for s in self.segs.get(arg.name, ()):
                self.sp.get(s)["blocked"].append(reason)

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
        elif node.op == "call_function" and _fn_name(node) in ("cat", "concat", "concatenate"):
            self.visit_cat(node)
        elif any(a.name in self.segs for a in node.all_input_nodes):
            self.visit_concat_reader(node)
        elif node.op == "call_module":
            self.visit_module(node)
        elif node.op != "get_attr":
            self.visit_function(node)
        if node.name in self.space_of and node.name not in self.cdim:
            self.cdim[node.name] = self._first_cdim(node)

    def _first_cdim(self, node: fx.Node) -> int:
        first = node.args[0] if node.args and isinstance(node.args[0], fx.Node) else None
        return self.cdim.get(first.name, 1) if first is not None else 1

    def _first(self, node: fx.Node) -> Optional[int]:
        return (
            self.space_of.get(node.args[0].name) if node.args and isinstance(node.args[0], fx.Node) else None
        )

    def count_call(self, node: fx.Node) -> None:
        """Record a module's call (a module called twice is blocked: both sites would need to agree)."""
        self.calls_per_module[node.target] = self.calls_per_module.get(node.target, 0) + 1
        self.call_node[node.target] = node.name

    def visit_module(self, node: fx.Node) -> None:
        mod, first, sp = self.modules[node.target], self._first(node), self.sp
        self.count_call(node)
        last = self._first_cdim(node) == -1  # the input is a channels-last map
        if last and not isinstance(mod, (nn.Linear, nn.LayerNorm, *_PASSTHROUGH_MODULES)):
            self.block(node, f"{type(mod).__name__} {node.target} on a channels-last input")
            self.new_space(node, _channels(node) or 0, "blocked", f"output of {type(mod).__name__}")
        elif isinstance(mod, nn.Conv2d):
            # depthwise (one channel per group) or grouped with as many outputs as inputs: group g
            # maps input channels [g*w, (g+1)*w) to the same output range, so the conv carries its
            # input's channel space, and dropping whole groups keeps it a valid grouped conv
            carried = mod.groups > 1 and mod.in_channels == mod.out_channels
            if carried and first is not None:
                sp.get(first)["members"].append(node.target)
                sp.get(first)["atoms"].append(mod.in_channels // mod.groups)
                self.space_of[node.name] = first
            elif mod.groups == 1 and first is not None:
                sp.get(first)["readers"].append(node.target)
                self.new_space(node, mod.out_channels, "producer")
            else:
                self.block(
                    node,
                    f"grouped conv {node.target} with {mod.in_channels} inputs and {mod.out_channels} outputs",
                )
                self.new_space(node, mod.out_channels, "blocked", f"output of grouped conv {node.target}")
        elif isinstance(mod, nn.Linear) and first is not None:
            shape = _shape(node.args[0])
            if shape is not None and (len(shape) == 2 or last):  # (N, C), or a channels-last map
                sp.get(first)["readers"].append(node.target)
            else:
                self.block(node, f"Linear {node.target} on a non-flat input")
            self.new_space(node, mod.out_features, "producer")
            self.cdim[node.name] = -1
        elif isinstance(mod, nn.LayerNorm) and first is not None and last:
            self.space_of[node.name] = first  # channels stay aligned, but none can be removed
            sp.get(first)["blocked"].append(f"{_LAYER_NORM}: {node.target}")
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
        name, first, last = _fn_name(node), self._first(node), self._first_cdim(node) == -1
        if _makes_tensors(node):
            self.block(node, f"{name} ({node.name}) splits or reduces the channels")
            return
        c = _channels(node, -1 if last else 1)
        if c is None:  # sizes, shapes and other non-tensor values
            return
        params = [a for a in node.all_input_nodes if a.op == "get_attr" and _numel(a) > 1]
        if name == "permute" and first is not None:
            self.visit_permute(node, first, last)
        elif name == "layer_norm" and first is not None:
            self.space_of[node.name] = first
            self.sp.get(first)["blocked"].append(f"{_LAYER_NORM}: {node.name}")
        elif last and name not in _PASSTHROUGH_FUNCTIONS and name not in ("add", "iadd", "mul", "imul"):
            self.block(node, f"{name} on a channels-last map ({node.name})")
            self.new_space(node, c, "blocked", f"output of {name}")
        elif params:
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

    def visit_permute(self, node: fx.Node, first: int, last: bool) -> None:
        dims = (
            node.args[1:]
            if len(node.args) > 2
            else node.args[1]
            if len(node.args) > 1
            else node.kwargs.get("dims")
        )
        dims = tuple(int(d) for d in dims) if dims is not None else ()
        if dims == (_TO_CHANNELS_FIRST if last else _TO_CHANNELS_LAST):
            self.space_of[node.name] = first
            self.cdim[node.name] = 1 if last else -1
        else:
            self.block(node, f"permute {dims} moves the channels elsewhere ({node.name})")
            c = _channels(node)
            self.new_space(node, c or 0, "blocked", "output of permute")

    def visit_reshape(self, node: fx.Node, name: str, c: int, first: int) -> None:
        in_shape, out_shape = _shape(node.args[0]), _shape(node)
        spatial = 1
        for d in (in_shape or ())[2:]:
            spatial *= d
        if in_shape and out_shape and spatial == 1 and out_shape[:2] == in_shape[:2]:
            self.space_of[node.name] = first
        elif name == "mean" and in_shape and out_shape and out_shape[:2] == in_shape[:2]:
            self.space_of[node.name] = first  # global average pooling written as x.mean([2, 3])
        elif _regroups_channels(in_shape, out_shape):
            self.block(node, f"{name} regroups the channels (a channel shuffle, {node.name})")
            self.new_space(node, c, "blocked", f"output of {name}")
        else:
            self.block(node, f"{name} mixes channels with spatial positions ({node.name})")
            self.new_space(node, c, "blocked", f"output of {name}")

    def _width(self, node: fx.Node) -> Optional[int]:
        return _channels(node, self.cdim.get(node.name, 1))

    def _inputs(self, node: fx.Node) -> list[fx.Node]:
        return [a for a in node.all_input_nodes if a.name in self.space_of]

    def visit_add(self, node: fx.Node, name: str, c: int) -> bool:
        if not (
            node.target in (operator.add, torch.add, operator.iadd, "add", "add_") or name in ("add", "iadd")
        ):
            return False
        ins = self._inputs(node)
        tensor_ins = [self.space_of[a.name] for a in ins if self._width(a) == c]
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
        gates = [a for a in ins if a not in full and self._width(a) == c]
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

    def visit_cat(self, node: fx.Node) -> None:
        """A concatenation along the channels becomes the list of its inputs' spaces."""
        tensors = node.args[0] if node.args else node.kwargs.get("tensors")
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", node.kwargs.get("axis", 0))
        shape = _shape(node)
        parts: list[int] = []
        ok = shape is not None and isinstance(tensors, (list, tuple)) and isinstance(dim, int)
        ok = ok and dim % len(shape) == 1
        for t in tensors if isinstance(tensors, (list, tuple)) else ():
            if not isinstance(t, fx.Node):
                ok = False
            elif t.name in self.segs:
                parts += self.segs[t.name]
            elif t.name in self.space_of and self.cdim.get(t.name, 1) == 1:
                parts.append(self.space_of[t.name])
            else:
                ok = False
        if ok:
            self.segs[node.name] = parts
            return
        self.block(node, f"cat ({node.name}) does not join channel maps along the channels")
        self.new_space(node, _channels(node) or 0, "blocked", "output of cat")

    def visit_concat_reader(self, node: fx.Node) -> None:
        """A node that takes a concatenation: carried (BatchNorm, activations, pooling, a flatten
        of a 1x1 map), read (a dense conv or a Linear on a flat input) or blocked."""
        src = node.args[0] if node.args and isinstance(node.args[0], fx.Node) else None
        segs = self.segs.get(src.name) if src is not None else None
        name = node.target if node.op == "call_module" else _fn_name(node)
        if node.op == "call_module":
            self.count_call(node)
        # the concatenation is its only tensor input (sizes, as in a view's shape, may come too)
        only_src = segs is not None and all(a is src or _shape(a) is None for a in node.all_input_nodes)
        mod = self.modules.get(node.target) if node.op == "call_module" else None
        in_shape, out_shape = (_shape(src), _shape(node)) if src is not None else (None, None)
        if node.op != "call_module" and not _makes_tensors(node) and _channels(node) is None:
            return  # a size or shape query
        if only_src and (
            isinstance(mod, _PASSTHROUGH_MODULES) or (mod is None and name in _PASSTHROUGH_FUNCTIONS)
        ):
            self.segs[node.name] = segs
        elif only_src and isinstance(mod, (nn.BatchNorm2d, nn.BatchNorm1d)):
            for s in segs:
                self.sp.get(s)["members"].append(node.target)
            self.views.append((node.target, segs))
            self.segs[node.name] = segs
        elif only_src and (
            (isinstance(mod, nn.Conv2d) and mod.groups == 1)
            or (isinstance(mod, nn.Linear) and in_shape is not None and len(in_shape) == 2)
        ):
            for s in segs:
                self.sp.get(s)["readers"].append(node.target)
            self.views.append((node.target, segs))
            self.new_space(node, _channels(node, -1 if isinstance(mod, nn.Linear) else 1) or 0, "producer")
            if isinstance(mod, nn.Linear):
                self.cdim[node.name] = -1
        elif (
            only_src
            and mod is None
            and name in ("flatten", "view", "reshape", "mean", "squeeze")
            and in_shape
            and out_shape
            and out_shape[:2] == in_shape[:2]
            and (name == "mean" or math.prod(in_shape[2:]) == 1)
        ):
            self.segs[node.name] = segs  # global pooling, or a flatten of a 1x1 map
        elif only_src and _regroups_channels(in_shape, out_shape):
            self.block(
                node, f"{name} regroups the channels of a concatenation (a channel shuffle, {node.name})"
            )
            self.new_space(node, _channels(node) or 0, "blocked", f"output of {name}")
        else:
            self.block(node, f"{name} on a concatenation ({node.name}) is not supported")
            if not _makes_tensors(node):
                self.new_space(node, _channels(node) or 0, "blocked", f"output of {name}")

    def block_shared_modules(self) -> None:
        for target, n in self.calls_per_module.items():
            if n > 1:  # a module applied twice would need both call sites to agree
                for s in set(self.space_of.values()):
                    info = self.sp.get(s)
                    if target in info["producers"] + info["readers"] + info["members"]:
                        info["blocked"].append(f"module {target} is called {n} times")
