"""The models a profile compares: files grouped into :class:`ArtifactSet`s, and what each one
is (architecture, MACs, params, input size, classes)."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Optional

from gslim.errors import GslimError
from gslim.profiling import ArtifactSet

OUTPUT_NAMES = {
    "latency": "latency.json",
    "report_json": "report.json",
    "report_md": "report.md",
    "plot": "tradeoff.png",
}
KIND_BY_SUFFIX = {
    ".pt": "pt",
    ".pth": "pt",
    ".onnx": "onnx",
    ".engine": "engine",
    ".plan": "engine",
    ".trt": "engine",
}


def group_artifacts(paths: list[Path], base: Optional[str] = None) -> list[ArtifactSet]:
    """Files → ArtifactSets: same directory + same stem = one model; the base comes first.

    ``base`` is a label (the stem, or ``dir/stem`` when stems collide) or a 0-based index into
    the groups in command-line order; by default the first group is the base.
    """
    if not paths:
        raise GslimError("give at least one artifact (.pt, .onnx or .engine)")
    groups: dict[tuple[Path, str], dict[str, Path]] = {}
    for p in paths:
        p = Path(p)
        if not p.exists():
            raise GslimError(f"artifact not found: {p}")
        if not p.is_file():
            raise GslimError(f"artifact is not a file: {p}")
        kind = KIND_BY_SUFFIX.get(p.suffix.lower())
        if kind is None:
            raise GslimError(
                f"unsupported artifact {p.name}: give gslim checkpoints (.pt), "
                "ONNX files (.onnx) or TensorRT engines (.engine)"
            )
        key = (p.resolve().parent, p.stem)
        files = groups.setdefault(key, {})
        if kind in files and files[kind].resolve() != p.resolve():
            raise GslimError(
                f"two {kind} files for the model {p.stem!r} in {p.parent}: {files[kind]} and {p}"
            )
        files[kind] = p
    stems = [stem for _, stem in groups]
    sets = []
    for (parent, stem), files in groups.items():
        label = stem if stems.count(stem) == 1 else f"{parent.name}/{stem}"
        sets.append(
            ArtifactSet(
                label=label,
                role="compressed",
                checkpoint=files.get("pt"),
                onnx=files.get("onnx"),
                engine=files.get("engine"),
            )
        )
    labels = [s.label for s in sets]
    if len(set(labels)) != len(labels):
        raise GslimError(f"artifact labels collide ({', '.join(labels)}); rename the files")
    idx = 0
    if base is not None:
        if base in labels:
            idx = labels.index(base)
        elif base.strip().isdigit() and int(base) < len(sets):
            idx = int(base)
        else:
            raise GslimError(
                f"--base {base!r} names no artifact; choose one of {', '.join(labels)} "
                f"or an index 0..{len(sets) - 1}"
            )
    sets[idx].role = "base"
    return [sets[idx]] + [s for i, s in enumerate(sets) if i != idx]


def onnx_shape_hints(path: Path) -> tuple[Optional[int], Optional[int]]:
    """(input size, classes) from an ONNX file's static dims, where it has them."""
    import onnx

    from gslim.runtime import onnx_io_info

    info = onnx_io_info(path)
    dims = info["dims"]
    size = dims[2] if len(dims) == 4 and isinstance(dims[2], int) and dims[2] > 0 else None
    model = onnx.load(str(path), load_external_data=False)
    classes = None
    out = model.graph.output[0].type.tensor_type.shape.dim if model.graph.output else []
    if len(out) == 2 and out[1].HasField("dim_value"):
        classes = out[1].dim_value
    return size, classes


def describe_artifact(a: ArtifactSet) -> dict[str, Any]:
    """Files, sizes, arch, MACs and params (from the checkpoint, where there is one)."""
    from gslim.models import count_macs_params, load_model

    files = a.files()
    if not files:
        raise GslimError(f"artifact {a.label!r} has no files")
    for kind, p in files.items():
        if not p.is_file():
            raise GslimError(f"artifact {a.label!r}: {kind} file not found: {p}")
    info: dict[str, Any] = {
        "label": a.label,
        "role": a.role,
        "files": {k: str(p) for k, p in files.items()},
        "file_sizes": {k: p.stat().st_size for k, p in files.items()},
        "extra": dict(a.extra),
        "arch": None,
        "macs": None,
        "params": None,
        "input_size": None,
        "num_classes": None,
        "widths": None,
    }
    if a.checkpoint is not None:
        model, spec = load_model(a.checkpoint)
        with warnings.catch_warnings():  # fvcore's import warns about torch.jit.script
            warnings.simplefilter("ignore", FutureWarning)
            macs, params = count_macs_params(model, spec.input_size)
        info.update(
            arch=spec.arch,
            macs=macs,
            params=params,
            input_size=spec.input_size,
            num_classes=spec.num_classes,
            widths=spec.widths,
        )
        del model
    elif a.onnx is not None:
        info["input_size"], info["num_classes"] = onnx_shape_hints(Path(a.onnx))
    return info


def common_value(infos: list[dict[str, Any]], key: str, fallback: int, what: str) -> int:
    values = {i["label"]: i[key] for i in infos if i[key] is not None}
    distinct = set(values.values())
    if len(distinct) > 1:
        pairs = ", ".join(f"{k}: {v}" for k, v in values.items())
        raise GslimError(
            f"the artifacts disagree on the {what} ({pairs}); profile comparable models together"
        )
    return distinct.pop() if distinct else fallback
