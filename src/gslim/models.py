"""Model construction and checkpoints.

A gslim checkpoint is a plain dict that loads with ``torch.load(weights_only=True)``:

    {"format": "gslim", "version": 1, "arch": "mobilenet_v2", "num_classes": 10,
     "input_size": 32, "widths": {unit_name: kept_channels} or None,
     "state_dict": {...}, "meta": {...JSON-able...}}

It never pickles a module. A compressed model is rebuilt by constructing the base
torchvision architecture, narrowing its layers to the shapes of the checkpoint's tensors
(:mod:`gslim.shapes`; no graph trace) and loading the state dict.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from gslim.artifacts import load_torch, save_torch
from gslim.errors import GslimError

CHECKPOINT_FORMAT = "gslim"
CHECKPOINT_VERSION = 1


@dataclass
class ModelSpec:
    """Everything needed to rebuild a model's architecture."""

    arch: str
    num_classes: int
    input_size: int
    widths: Optional[dict[str, int]] = None
    meta: dict[str, Any] = field(default_factory=dict)


def available_architectures() -> list[str]:
    import torchvision

    return sorted(torchvision.models.list_models(module=torchvision.models))


def build_architecture(arch: str, num_classes: int) -> nn.Module:
    """Randomly initialised torchvision classifier with ``num_classes`` outputs."""
    import torchvision

    if arch not in available_architectures():
        raise GslimError(
            f"unknown architecture {arch!r}; choose a torchvision classification model such as "
            "mobilenet_v2, mobilenet_v3_small, mobilenet_v3_large, resnet18, resnet34, resnet50"
        )
    kwargs: dict[str, Any] = {"weights": None, "num_classes": num_classes}
    if arch.startswith(("inception", "googlenet")):
        kwargs["aux_logits"] = False
        kwargs["init_weights"] = True
    return torchvision.models.get_model(arch, **kwargs)


def replace_classifier(model: nn.Module, num_classes: int) -> nn.Module:
    """Swap the last Linear layer for a fresh one with ``num_classes`` outputs."""
    last_name, last = None, None
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear):
            last_name, last = name, mod
    if last is None:
        raise GslimError("cannot replace the classifier: the model has no Linear layer")
    if last.out_features != num_classes:
        model.set_submodule(last_name, nn.Linear(last.in_features, num_classes, bias=last.bias is not None))
    return model


def _torchvision_weights(arch: str, name: str):
    import torchvision

    try:
        enum = torchvision.models.get_model_weights(arch)
    except (ValueError, KeyError) as exc:
        raise GslimError(f"architecture {arch!r} has no torchvision weights") from exc
    try:
        return enum[name] if name != "DEFAULT" else enum.DEFAULT
    except KeyError as exc:
        choices = ", ".join(w.name for w in enum)
        raise GslimError(f"{arch} has no weights {name!r}; available: {choices}, DEFAULT") from exc


def _hub_cache_file(weights) -> Path:
    from urllib.parse import urlparse

    return Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(weights.url).path).name


def _looks_like_enum_name(s: str) -> bool:
    return s == "DEFAULT" or (s.isupper() and "_" in s and not Path(s).suffix)


def load_pretrained(arch: str, weights: str, num_classes: int) -> nn.Module:
    """Build ``arch`` with torchvision weights (offline: from the torch hub cache) or a local file."""
    if _looks_like_enum_name(weights):
        w = _torchvision_weights(arch, weights)
        cached = _hub_cache_file(w)
        if not cached.is_file():
            raise GslimError(
                f"{arch} weights {w.name} are not in the torch hub cache ({cached}); download them on a "
                f"connected machine (python -c \"import torchvision; torchvision.models.get_model('{arch}', "
                f"weights='{w.name}')\") and copy that file there, or pass a local checkpoint path"
            )
        import torchvision

        model = torchvision.models.get_model(arch, weights=w)
        return replace_classifier(model, num_classes)
    path = Path(weights)
    if not path.exists():
        raise GslimError(f"weights {weights!r} is neither a torchvision weights name nor an existing file")
    model, _ = load_model(path, expect_arch=arch, num_classes=num_classes)
    return model


def build_model(arch: str, num_classes: int, weights: Optional[str] = None) -> nn.Module:
    """The recipe's model: torchvision weights by name, a local checkpoint, or random init."""
    if weights is None:
        return build_architecture(arch, num_classes)
    return load_pretrained(arch, weights, num_classes)


def model_from_spec(spec: ModelSpec, state: Optional[dict[str, torch.Tensor]] = None) -> nn.Module:
    """The spec's architecture; a compressed one (``spec.widths``) takes its layer widths from the
    checkpoint's own tensor shapes (:func:`gslim.shapes.fit_to_state`: no channel analysis)."""
    model = build_architecture(spec.arch, spec.num_classes)
    if spec.widths and state is not None:
        from gslim.shapes import fit_to_state

        fit_to_state(model, state)
    return model


def save_checkpoint(model: nn.Module, spec: ModelSpec, path: str | Path) -> Path:
    """Atomically write a gslim checkpoint (no pickled code)."""
    state = {k: v.detach().cpu().contiguous() for k, v in _unwrap(model).state_dict().items()}
    payload = {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "arch": spec.arch,
        "num_classes": int(spec.num_classes),
        "input_size": int(spec.input_size),
        "widths": {k: int(v) for k, v in spec.widths.items()} if spec.widths else None,
        "state_dict": state,
        "meta": spec.meta,
    }
    return save_torch(payload, path)


def read_checkpoint(path: str | Path) -> tuple[ModelSpec, dict[str, torch.Tensor]]:
    """Read a gslim checkpoint (or a bare state dict, which has no spec: arch must come from elsewhere)."""
    obj = load_torch(path)
    if isinstance(obj, dict) and obj.get("format") == CHECKPOINT_FORMAT:
        for key in ("arch", "num_classes", "input_size", "state_dict"):
            if key not in obj:
                raise GslimError(f"checkpoint {path} is missing its {key!r} entry")
        spec = ModelSpec(
            arch=obj["arch"],
            num_classes=int(obj["num_classes"]),
            input_size=int(obj["input_size"]),
            widths=obj.get("widths") or None,
            meta=obj.get("meta") or {},
        )
        return spec, obj["state_dict"]
    if isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return ModelSpec(arch="", num_classes=0, input_size=0), obj
    if isinstance(obj, dict) and "model" in obj and isinstance(obj["model"], dict):  # torchvision train.py
        return ModelSpec(arch="", num_classes=0, input_size=0), obj["model"]
    raise GslimError(f"{path} is not a gslim checkpoint or a state dict")


def load_state_dict_checked(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """load_state_dict with one-line errors for missing keys and shape mismatches."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing key(s) (first: {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected key(s) (first: {unexpected[0]})")
        raise GslimError(f"{source} does not fit the model: " + ", ".join(parts) + " — another architecture?")
    for k, v in own.items():
        if tuple(state[k].shape) != tuple(v.shape):
            raise GslimError(
                f"{source} does not fit the model: {k} has shape {tuple(state[k].shape)} in the checkpoint "
                f"but {tuple(v.shape)} in the model (another architecture, width or number of classes?)"
            )
    model.load_state_dict(state, strict=True)


def load_model(
    path: str | Path,
    expect_arch: Optional[str] = None,
    num_classes: Optional[int] = None,
    input_size: Optional[int] = None,
) -> tuple[nn.Module, ModelSpec]:
    """Load any gslim checkpoint (base or compressed) as an eval-mode model and its spec.

    A bare state dict needs ``expect_arch`` and ``num_classes``. A gslim checkpoint whose
    arch differs from ``expect_arch`` is rejected.
    """
    spec, state = read_checkpoint(path)
    if not spec.arch:
        if not expect_arch or not num_classes:
            raise GslimError(f"{path} is a bare state dict: the recipe must name model.arch and num_classes")
        spec = ModelSpec(arch=expect_arch, num_classes=num_classes, input_size=input_size or 224)
        if "fc.weight" in state or any(k.endswith(".weight") for k in state):
            head = _classifier_rows(state)
            if head is not None and head != num_classes:
                # A torchvision checkpoint with another head: keep the body, re-initialise the head.
                model = build_architecture(expect_arch, head)
                load_state_dict_checked(model, state, str(path))
                replace_classifier(model, num_classes)
                return model.eval(), spec
    elif expect_arch and spec.arch != expect_arch:
        raise GslimError(f"{path} holds a {spec.arch} but the recipe asks for {expect_arch}")
    if num_classes and spec.num_classes != num_classes:
        raise GslimError(
            f"{path} has {spec.num_classes} classes but the recipe asks for {num_classes}"
            " (set model.num_classes to match, or fine-tune a new head from a bare state dict)"
        )
    model = model_from_spec(spec, state)
    load_state_dict_checked(model, state, str(path))
    return model.eval(), spec


def _classifier_rows(state: dict[str, torch.Tensor]) -> Optional[int]:
    last = None
    for k, v in state.items():
        if k.endswith(".weight") and v.ndim == 2:
            last = v.shape[0]
    return last


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if hasattr(model, "module") and isinstance(model.module, nn.Module) else model


def count_macs_params(model: nn.Module, input_size: int) -> tuple[int, int]:
    """MACs (fvcore's FLOP count, which counts one multiply-add as one) and parameters, batch 1."""
    import logging
    import warnings

    with warnings.catch_warnings():  # fvcore scripts a loss at import: "torch.jit.script is deprecated"
        warnings.simplefilter("ignore", FutureWarning)
        from fvcore.nn import FlopCountAnalysis

    model = _unwrap(model)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    x = torch.zeros(1, 3, input_size, input_size, device=device)
    logging.getLogger("fvcore").setLevel(logging.ERROR)
    with torch.no_grad():
        fca = FlopCountAnalysis(model, x)
        fca.unsupported_ops_warnings(False)
        fca.uncalled_modules_warnings(False)
        macs = int(fca.total())
    params = sum(p.numel() for p in model.parameters())
    model.train(was_training)
    return macs, int(params)
