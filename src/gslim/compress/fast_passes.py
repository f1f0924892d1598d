"""The network's own time in greedy selection's passes: BatchNorm folded into the conv before it,
and the images laid out channels-last on a CPU.

Greedy selection runs the network twice (the planning pass over the original, the walk over the
pruned one), and on a CPU those two passes are most of its time. Two standard inference
rewrites make them cheaper without changing what is computed beyond float rounding:

- an eval-mode BatchNorm that reads a conv's output and nothing else is folded into that conv's
  weights at each call, from the layers' current parameters (so the walk's surgery and re-fits
  are seen). A conv with a hook on its output (a consumer in the planning pass whose targets
  are read from its output, ``planning.targets_from_rows``), a BatchNorm with hooks, or either in
  training mode runs as written;
- on a CPU the calibration images are laid out channels-last: oneDNN's convolutions (depthwise
  and 1x1 above all) run faster on it, and the layout follows the input through the network;
  a folded BatchNorm is then no separate pass over a channels-last map, which was slower than
  over a planar one;
- in the walk's traced segments a residual sum is written into the conv's (or BatchNorm's)
  output it adds, where nothing else reads that output (:func:`reuse_add_operands`), as the
  eager ``out += identity`` does: FX records it as ``out + identity``.

One pass over 256 images at 224 px, two threads, as built -> rewritten (every pair folded;
``benchmarks/selection_phases.py``, its "forward s" and "rewritten pass s"): MobileNetV2 3.2 ->
1.7 s, MobileNetV3-large 2.5 -> 1.4 s, ResNet-18 4.7 -> 3.8 s, ResNet-50 12.7 -> 9.2 s. The
selection's results change by float rounding only (on the trained demo MobileNetV2 the one-shot
top-1 at 50% and 30% MACs is the same to the hundredth; in random-weight networks near-tied
channels can swap).
"""

from __future__ import annotations

import collections
import contextlib
import operator
import weakref
from typing import Iterator, Sequence

import torch
import torch.fx as fx
from torch import nn


def foldable_pairs(gm: fx.GraphModule) -> list[tuple[str, str]]:
    """(conv, BatchNorm) module names where the BatchNorm runs right after the conv on its output
    alone, and each runs once in the graph. Right after, so that within one graph the folded
    output reaches its BatchNorm as the very tensor the conv returned; where a graph is cut
    between them (the walk ends a segment after a consumer conv) the caller leaves the pair out
    (``greedy.walk_cut_layers``), and a BatchNorm handed another tensor raises."""
    mods = dict(gm.named_modules())
    calls = collections.Counter(n.target for n in gm.graph.nodes if n.op == "call_module")
    nodes = list(gm.graph.nodes)
    pairs = []
    for conv, bn in zip(nodes, nodes[1:]):
        if conv.op != "call_module" or bn.op != "call_module":
            continue
        if calls[conv.target] != 1 or calls[bn.target] != 1:
            continue
        if type(mods[conv.target]) is not nn.Conv2d or type(mods[bn.target]) is not nn.BatchNorm2d:
            continue  # (exact types: a subclass may compute something else)
        if list(conv.users) == [bn] and bn.args == (conv,) and not bn.kwargs:
            pairs.append((conv.target, bn.target))
    return pairs


@contextlib.contextmanager
def folded_batchnorm(models: Sequence[nn.Module], pairs: Sequence[tuple[str, str]]) -> Iterator[None]:
    """Within the block, each pair of ``pairs`` present in ``models`` runs as one conv with the
    BatchNorm folded in (see the module's docstring); the modules are as before afterwards."""
    installed: list[nn.Module] = []
    try:
        for model in models:
            for conv_name, bn_name in pairs:
                conv, bn = model.get_submodule(conv_name), model.get_submodule(bn_name)
                if "forward" in conv.__dict__ or "forward" in bn.__dict__ or bn.running_var is None:
                    continue
                conv_forward, bn_forward = _folded_forwards(conv, bn)
                conv.forward, bn.forward = conv_forward, bn_forward
                installed += [conv, bn]
        yield
    finally:
        for mod in installed:
            mod.__dict__.pop("forward", None)


def _folded_forwards(conv: nn.Conv2d, bn: nn.BatchNorm2d):
    folded = [None]  # a weak reference to the last output the conv returned with the BatchNorm in

    def conv_forward(x: torch.Tensor) -> torch.Tensor:
        folded[0] = None
        if conv.training or bn.training or _sees_output(conv) or _sees_output(bn) or bn._forward_pre_hooks:
            return nn.Conv2d.forward(conv, x)
        scale = torch.rsqrt(bn.running_var + bn.eps)
        if bn.weight is not None:
            scale = scale * bn.weight
        shift = -bn.running_mean if conv.bias is None else conv.bias - bn.running_mean
        shift = shift * scale
        if bn.bias is not None:
            shift = shift + bn.bias
        out = conv._conv_forward(x, conv.weight * scale.reshape(-1, 1, 1, 1), shift)
        folded[0] = weakref.ref(out)
        return out

    def bn_forward(x: torch.Tensor) -> torch.Tensor:
        ref, folded[0] = folded[0], None
        pending = ref() if ref is not None else None
        if pending is x:
            return x  # (normalised already: the conv ran with this BatchNorm in)
        if pending is not None:  # never normalise twice: a folded output reached it as another tensor
            raise RuntimeError("a BatchNorm folded into its conv got a tensor its conv did not return")
        return nn.BatchNorm2d.forward(bn, x)

    return conv_forward, bn_forward


def _sees_output(mod: nn.Module) -> bool:
    """Whether a hook reads ``mod``'s output (a pre-hook reads the input, which a fold leaves as
    it is: the walk's consumers, hooked for their input's statistics, fold the same whether a
    unit's pass has its hooks on them or not, so every way through the walk computes alike)."""
    module = nn.modules.module
    return bool(mod._forward_hooks or module._global_forward_hooks or module._global_forward_pre_hooks)


def statistics_layout(x: torch.Tensor) -> torch.Tensor:
    """Images as the statistics passes read them: channels-last on a CPU (oneDNN's faster
    layout; the layout follows the input through the network), as given elsewhere (on CUDA
    untested for speed)."""
    if x.dim() == 4 and x.device.type == "cpu":
        return x.contiguous(memory_format=torch.channels_last)
    return x


def channels_selected(v: torch.Tensor, dim: int, keep: torch.Tensor) -> torch.Tensor:
    """``v.index_select(dim, keep)`` that keeps a channels-last map channels-last (and ~3x
    faster there: index_select along a channels-last map's channels is a strided gather, and
    its planar result would send the layers after it back to the slower layout)."""
    keep = keep.to(v.device)
    if dim == 1 and v.dim() == 4 and _channels_last_only(v):
        n, c, h, w = v.shape
        rows = v.permute(0, 2, 3, 1).reshape(-1, c)  # (a view: the map's own memory order)
        out = torch.gather(rows, 1, keep.expand(rows.shape[0], -1))
        return out.view(n, h, w, -1).permute(0, 3, 1, 2)
    return v.index_select(dim, keep)


def _channels_last_only(v: torch.Tensor) -> bool:
    return v.is_contiguous(memory_format=torch.channels_last) and not v.is_contiguous()


def _add_into_first(a, b):
    """``a + b``, written into ``a`` where the result is ``a``'s shape and dtype (bit for bit the
    same sum; see :func:`reuse_add_operands`)."""
    return a.add_(b) if _can_take(a, b) else a + b


def _add_into_second(a, b):
    """``a + b``, written into ``b`` where the result is ``b``'s shape and dtype (a float sum is
    the same in either order)."""
    return b.add_(a) if _can_take(b, a) else a + b


_REUSING = (_add_into_first, _add_into_second)


def _can_take(dst, other) -> bool:
    """Whether ``dst += other`` computes ``dst + other`` in ``dst``'s own memory: no broadcast to a
    larger shape, no promotion to another dtype, nothing for autograd to keep."""
    if not isinstance(dst, torch.Tensor) or dst.requires_grad:
        return False
    other_shape = other.shape if isinstance(other, torch.Tensor) else ()
    return (
        torch.broadcast_shapes(dst.shape, other_shape) == dst.shape
        and torch.result_type(dst, other) == dst.dtype
    )


def _fresh_single_use(node, mods: dict[str, nn.Module]) -> bool:
    """Whether ``node``'s value is a tensor of its own that only the one node reading it reads: a
    conv's output, or a BatchNorm's -- which, folded into the conv before it, returns that conv's
    output, and the fold takes a conv whose output nothing else reads (``foldable_pairs``). Not
    a placeholder: a segment's input or a chain's kept value is read again by a later pass."""
    if not isinstance(node, fx.Node) or node.op != "call_module" or len(node.users) != 1:
        return False
    mod = mods.get(node.target)
    if type(mod) is nn.Conv2d:
        return True
    if type(mod) is nn.BatchNorm2d:
        src = node.args[0] if node.args else None
        return isinstance(src, fx.Node) and src.op != "placeholder" and len(src.users) == 1
    return False


def reuse_add_operands(gm: fx.GraphModule) -> fx.GraphModule:
    """Rewrite ``gm``'s two-operand ``operator.add`` nodes to write the sum into an operand that is
    a conv's or BatchNorm's fresh output read by the sum alone (:func:`_fresh_single_use`), and
    back to ``operator.add`` where that no longer holds (a graph split from a rewritten one,
    whose operand is now a placeholder). Returns ``gm``.

    Eager torchvision ResNets add in place (``out += identity``); FX records ``out + identity``,
    so each residual sum of the walk's segments wrote a new map while the conv's was still alive:
    at ResNet-50's layer1, 196 MB a batch more, into memory the process had not used (on the
    2-core VM each such first touch costs up to 7 s a GiB: ``benchmarks/selection_memory.py``).
    Run without autograd (the walk) or with it (the guard falls back to ``a + b``), the values
    are the same bit for bit: one float addition per element either way."""
    mods = dict(gm.named_modules())
    changed = False
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.kwargs or len(node.args) != 2:
            continue
        if node.target is not operator.add and node.target not in _REUSING:
            continue
        target = next(
            (fn for arg, fn in zip(node.args, _REUSING) if _fresh_single_use(arg, mods)), operator.add
        )
        if node.target is not target:
            node.target, changed = target, True
    if changed:
        gm.recompile()
    return gm


def reuses_add_operands(gm: fx.GraphModule) -> bool:
    """Whether ``gm`` was rewritten by :func:`reuse_add_operands` (so graphs split from it are too)."""
    return any(n.op == "call_function" and n.target in _REUSING for n in gm.graph.nodes)
