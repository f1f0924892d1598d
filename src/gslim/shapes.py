"""Give a freshly built architecture the layer widths of a compressed checkpoint.

A compressed model is its architecture with fewer channels in some layers. Loading one needs
no channel analysis: the checkpoint's own tensors carry every width. :func:`fit_to_state`
resizes each layer whose tensors differ in shape (convolutions, linears, norms, and any other
per-channel parameter such as a layer scale) to the shapes in the state dict; the values are
then loaded over them. Only channel dimensions may shrink; anything else (another kernel size,
a wider layer) is left as is, for :func:`gslim.models.load_state_dict_checked` to refuse.
"""

from __future__ import annotations

import torch
from torch import nn


def fit_to_state(model: nn.Module, state: dict[str, torch.Tensor]) -> nn.Module:
    """Resize ``model``'s layers in place to the tensor shapes in ``state``; returns ``model``."""
    for prefix, mod in model.named_modules():
        shapes = {}
        for name, t in list(mod.named_parameters(recurse=False)) + list(mod.named_buffers(recurse=False)):
            key = f"{prefix}.{name}" if prefix else name
            if key in state and t is not None and _narrower(state[key].shape, t.shape):
                shapes[name] = tuple(state[key].shape)
        if shapes:
            _resize(mod, shapes)
    return model


def _narrower(new: torch.Size, old: torch.Size) -> bool:
    return len(new) == len(old) and tuple(new) != tuple(old) and all(n <= o for n, o in zip(new, old))


def _resize(mod: nn.Module, shapes: dict[str, tuple[int, ...]]) -> None:
    for name, shape in shapes.items():
        t = getattr(mod, name)
        new = torch.empty(shape, dtype=t.dtype, device=t.device)
        if isinstance(t, nn.Parameter):
            setattr(mod, name, nn.Parameter(new, requires_grad=t.requires_grad))
        else:
            mod._buffers[name] = new
    w = getattr(mod, "weight", None)
    if isinstance(mod, nn.modules.conv._ConvNd) and "weight" in shapes:
        carried = mod.groups > 1 and mod.in_channels == mod.out_channels
        mod.out_channels = w.shape[0]
        if carried:  # depthwise or grouped: whole groups went, the group width (w.shape[1]) stays
            mod.in_channels = w.shape[0]
            mod.groups = w.shape[0] // w.shape[1]
        else:
            mod.in_channels = w.shape[1] * mod.groups
    elif isinstance(mod, nn.Linear) and "weight" in shapes:
        mod.out_features, mod.in_features = w.shape
    elif isinstance(mod, nn.modules.batchnorm._NormBase):
        mod.num_features = next(iter(shapes.values()))[0]
    elif isinstance(mod, nn.LayerNorm) and w is not None:
        mod.normalized_shape = tuple(w.shape)
    elif isinstance(mod, nn.GroupNorm) and w is not None:
        mod.num_channels = w.shape[0]
