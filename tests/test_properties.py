"""Property-based tests (hypothesis): recipe parsing and channel slimming.

* Any mapping of valid and invalid values, and any ``--set`` overrides, parse into a Recipe or
  raise a one-line GslimError naming the offending key - never another exception.
* Slimming any keep-set of any unit of the six supported models computes exactly what the
  original model computes with the dropped channels masked out.

Example counts are small so the file runs in well under a minute on two CPU cores.
"""

from __future__ import annotations

import copy
import math
import re
import typing

import pytest
import torch
import torchvision
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel
from torch import nn

from gslim.compress.slim import masked_copy, slim_unit
from gslim.compress.units import find_units
from gslim.errors import GslimError
from gslim.recipe import Recipe, load_recipe, parse_recipe

SIX = ["mobilenet_v2", "mobilenet_v3_small", "mobilenet_v3_large", "resnet18", "resnet34", "resnet50"]

# --------------------------------------------------------------------------- recipe parsing


def _sections() -> dict[str, type[BaseModel]]:
    """Recipe fields whose values are sections (pydantic models), e.g. 'compress' -> CompressConfig."""
    out = {}
    for name, f in Recipe.model_fields.items():
        for t in (f.annotation, *typing.get_args(f.annotation)):
            if isinstance(t, type) and issubclass(t, BaseModel):
                out[name] = t
    return out


SECTIONS = _sections()
TOP_SCALARS = [n for n in Recipe.model_fields if n not in SECTIONS]
SECTION_KEYS = {name: list(model.model_fields) for name, model in SECTIONS.items()}

# Values that are valid somewhere, invalid elsewhere, and plain hostile.
SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(10**6), max_value=10**10),
    # allow_subnormal=False: `gslim compress` sets flush-to-zero for the whole process (torch.set_flush_denormal),
    # and hypothesis refuses to draw subnormals once another test in this process has run it
    st.floats(allow_nan=True, allow_infinity=True, allow_subnormal=False),
    st.text(max_size=6),
    st.sampled_from(
        [
            "50%",
            "150%",
            "0%",
            "-5%",
            "1e9",
            "2e3",
            "abc",
            "auto",
            "cpu",
            "cuda",
            "greedy",
            "l1",
            "sgd",
            "adamw",
            "synthetic",
            "imagefolder",
            "fashion-mnist",
            "fp16",
            "int8",
            "torch-cpu",
            "ort-cpu",
            "resnet18",
            "mobilenet_v3_small",
            "DEFAULT",
            "IMAGENET1K_V1",
        ]
    ),
)
VALUES = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
    max_leaves=6,
)
KEY = st.sampled_from(TOP_SCALARS + list(SECTIONS)) | st.text(min_size=1, max_size=6)


@st.composite
def recipe_dicts(draw) -> dict:
    data: dict = {}
    for name in draw(st.lists(st.sampled_from(TOP_SCALARS + list(SECTIONS)), unique=True, max_size=6)):
        if name in SECTIONS and draw(st.booleans()):
            keys = draw(st.lists(st.sampled_from(SECTION_KEYS[name]), unique=True, max_size=4))
            section = {k: draw(VALUES) for k in keys}
            if draw(st.integers(0, 9)) == 0:
                section[draw(st.text(min_size=1, max_size=6))] = draw(VALUES)  # an unknown key, usually
            data[name] = section
        else:
            data[name] = draw(VALUES)
    if draw(st.integers(0, 9)) == 0:
        data[draw(KEY)] = draw(VALUES)
    return data


def _key_text(key) -> str:
    """How an error message writes a key: plain when it looks like one, else quoted (repr)."""
    s = str(key)
    return s if re.fullmatch(r"[A-Za-z0-9_\-]+", s) else repr(key)


def _check_error_names_a_key(message: str, data: dict, source: str) -> None:
    assert "\n" not in message, message
    assert message.startswith(f"{source}: "), message
    rest = message[len(source) + 2 :]
    if rest.startswith("a recipe must be a YAML mapping"):
        return
    named = [_key_text(k) for k in data]
    assert rest.startswith("(top level): ") or any(
        rest.startswith(f"{k}: ") or rest.startswith(f"{k}.") for k in named
    ), f"{message!r} names none of {named}"


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(recipe_dicts())
def test_recipe_parses_or_names_the_key(data):
    try:
        recipe = parse_recipe(data, "recipe")
    except GslimError as exc:
        _check_error_names_a_key(str(exc), data, "recipe")
    else:
        assert isinstance(recipe, Recipe)
        assert recipe.model_dump(mode="json")  # and the result serialises (it is written with each run)


DOTTED = st.sampled_from(
    [f"{s}.{k}" for s, keys in SECTION_KEYS.items() for k in keys] + TOP_SCALARS + list(SECTIONS)
) | st.text(min_size=0, max_size=8)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(DOTTED, SCALARS, max_size=4))
def test_overrides_parse_or_name_the_key(overrides):
    """``--set key.path=value`` and CLI options go through the same validator as the file."""
    try:
        recipe = load_recipe(None, overrides)
    except GslimError as exc:
        message = str(exc)
        assert "\n" not in message
        assert message.startswith(("defaults: ", "cannot set ")), message
    else:
        assert isinstance(recipe, Recipe)
        for dotted, value in overrides.items():  # a value that was accepted is the value in the recipe
            parts = dotted.split(".")
            if value is None or len(parts) != 2 or parts[0] not in SECTIONS or isinstance(value, (bool, str)):
                continue
            got = getattr(getattr(recipe, parts[0]), parts[1], None)
            if isinstance(got, (int, float)) and not isinstance(got, bool) and not math.isnan(float(value)):
                if parts[1] not in ("target_macs", "target_params"):
                    assert float(got) == pytest.approx(float(value)), dotted


# --------------------------------------------------------------------------- slimming


def _randomise_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial BN statistics and affine parameters: masking a channel then changes the output."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(0.2 * torch.randn(m.num_features, generator=g))
            m.running_var.copy_(0.5 + torch.rand(m.num_features, generator=g))
            m.weight.data.copy_(0.5 + torch.rand(m.num_features, generator=g))
            m.bias.data.copy_(0.2 * torch.randn(m.num_features, generator=g))
    with torch.no_grad():  # ConvNeXt's layer scale starts at 1e-6: its blocks would not show
        for name, p in model.named_parameters():
            if name.endswith("layer_scale"):
                p.copy_(0.5 + torch.rand(p.shape, generator=g))
    return model.eval()


_BASE: dict[str, nn.Module] = {}


def _base(arch: str) -> nn.Module:
    if arch not in _BASE:
        torch.manual_seed(0)
        _BASE[arch] = _randomise_bn(torchvision.models.get_model(arch, num_classes=10))
    return _BASE[arch]


def _keep(width: int, how: str, frac: float, g: torch.Generator, atom: int = 1) -> list[int]:
    """A keep-set of whole groups of ``atom`` channels (a grouped conv carries the unit)."""
    n = width // atom
    perm = torch.randperm(n, generator=g).tolist()
    k = {
        "one": 1,
        "all": n,
        "all-but-one": max(1, n - 1),
        "fraction": max(1, min(n, round(frac * n))),
    }[how]
    return sorted(a * atom + i for a in perm[:k] for i in range(atom))


@pytest.mark.parametrize("arch", SIX + ["resnext50_32x4d", "regnet_y_400mf", "convnext_tiny"])
@settings(
    max_examples=3,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(
    seed=st.integers(0, 2**31 - 1),
    frac=st.floats(0.0, 1.0, allow_subnormal=False),
    modes=st.lists(st.sampled_from(["one", "all", "all-but-one", "fraction"]), min_size=1, max_size=4),
    share=st.floats(0.2, 1.0, allow_subnormal=False),
)
def test_slimmed_model_equals_the_masked_original(arch, seed, frac, modes, share):
    model = copy.deepcopy(_base(arch))
    g = torch.Generator().manual_seed(seed)
    units = find_units(model, 32).units
    assert units
    keeps: dict[str, list[int]] = {}
    for u in units:  # a random share of the units, each with a keep-set of a random kind
        if torch.rand((), generator=g) < share:
            how = modes[int(torch.randint(len(modes), (), generator=g))]
            keeps[u.name] = _keep(u.width, how, frac, g, u.atom)
    if not keeps:
        u = units[0]
        keeps[u.name] = _keep(u.width, "fraction", frac, g, u.atom)

    masked = masked_copy(model, [(u, keeps[u.name]) for u in units if u.name in keeps])
    slim = copy.deepcopy(model)
    for u in find_units(slim, 32).units:
        if u.name in keeps:
            slim_unit(slim, u, keeps[u.name])

    widths = {u.name: u.width for u in units}
    assert all(len(k) <= widths[n] for n, k in keeps.items())
    x = torch.randn(2, 3, 32, 32, generator=g)
    with torch.no_grad():
        want, got = masked(x), slim(x)
    assert got.shape == want.shape == (2, 10)
    scale = max(1.0, float(want.abs().max()))
    assert float((got - want).abs().max()) <= 1e-4 * scale
    if any(len(k) < widths[n] for n, k in keeps.items()):  # the masking mattered: slim is smaller
        assert sum(p.numel() for p in slim.parameters()) < sum(p.numel() for p in model.parameters())
