"""The YAML recipe: one file that describes a whole run, validated with key-named errors.

All validation lives here. Every section forbids unknown keys, so a typo such as
``epohcs`` is an error naming the key rather than a silently ignored setting. CLI options
override recipe values through :func:`apply_overrides` using dotted keys
(``train.epochs=5``), so the CLI and the recipe share one validator.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from gslim.errors import GslimError

DEFAULT_FASHION_MNIST = "/usr/share/datasets/fashion-mnist"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(_Section):
    arch: str = Field("mobilenet_v2", description="torchvision model builder name, e.g. resnet18")
    weights: Optional[str] = Field(
        None,
        description="torchvision weights enum name (IMAGENET1K_V2, DEFAULT), a local checkpoint path, "
        "or null for random init",
    )
    num_classes: int = Field(1000, ge=2)
    input_size: int = Field(224, ge=16, le=1024)


class DataConfig(_Section):
    kind: Literal["fashion-mnist", "imagefolder", "synthetic"] = "fashion-mnist"
    root: Optional[str] = Field(None, description="dataset directory (fashion-mnist: Debian's by default)")
    batch_size: int = Field(128, ge=1)
    eval_batch_size: Optional[int] = Field(None, ge=1)
    workers: int = Field(2, ge=0)
    calib_images: int = Field(512, ge=1, description="images drawn from train for compression/calibration")
    train_images: Optional[int] = Field(None, ge=1, description="use only this many training images")
    val_images: Optional[int] = Field(None, ge=1, description="use only this many validation images")
    synthetic_train: int = Field(512, ge=1)
    synthetic_val: int = Field(256, ge=1)

    def resolved_root(self) -> Optional[str]:
        if self.root is None and self.kind == "fashion-mnist":
            return DEFAULT_FASHION_MNIST
        return self.root


class DistillConfig(_Section):
    teacher: Optional[str] = Field(
        None, description="teacher checkpoint; finetune defaults to the base model"
    )
    alpha: float = Field(0.5, ge=0.0, le=1.0, description="weight of the KD term (1-alpha on cross-entropy)")
    temperature: float = Field(4.0, gt=0.0)


class TrainConfig(_Section):
    epochs: int = Field(3, ge=0)
    optimizer: Literal["sgd", "adamw"] = "sgd"
    lr: float = Field(0.1, gt=0.0, description="peak learning rate at batch_size 256 (scaled linearly)")
    momentum: float = Field(0.9, ge=0.0, lt=1.0)
    nesterov: bool = True
    weight_decay: float = Field(4e-5, ge=0.0)
    warmup_epochs: float = Field(0.3, ge=0.0)
    label_smoothing: float = Field(0.1, ge=0.0, lt=1.0)
    amp: bool = Field(True, description="mixed precision on CUDA (ignored on CPU)")
    channels_last: bool = Field(True, description="channels_last memory format on CUDA")
    distill: Optional[DistillConfig] = None
    device: Literal["auto", "cpu", "cuda"] = "auto"
    max_steps_per_epoch: Optional[int] = Field(None, ge=1, description="cap steps per epoch (smoke runs)")
    precise_bn_images: int = Field(
        2048,
        ge=0,
        description="train stage: re-estimate the base's BatchNorm statistics on this many calibration "
        "images after training (precise BN: the running averages lag the final weights; 0: keep them). "
        "Fine-tunes do not use it",
    )


class FinetuneConfig(TrainConfig):
    epochs: int = Field(1, ge=0)
    lr: Union[Annotated[float, Field(gt=0.0)], Literal["auto"]] = Field(
        "auto",
        description="peak learning rate at batch_size 256 (scaled linearly), or 'auto': the base's training "
        "lr (from its checkpoint when gslim trained it, else train.lr) times the factor of lr_probe_factors "
        "chosen on the held-out images by short probes: the first factor unless another beats it on a "
        "paired test at holdout_confidence (gslim.train.finetune_lr)",
    )
    lr_probe_factors: list[Annotated[float, Field(gt=0.0)]] = Field(
        [0.5, 0.2, 0.08],
        min_length=1,
        description="factors of the base's lr that an 'auto' lr is chosen from, each by a probe fine-tune "
        "(a quarter of the steps; the whole run when it has at most 64) scored on the held-out images; "
        "one factor: used without a probe",
    )
    warmup_epochs: float = Field(
        0.0, ge=0.0, description="no warm-up by default: the start is a trained model, not a random one"
    )
    distill: Optional[DistillConfig] = Field(default_factory=DistillConfig)
    distill_probe: list[DistillConfig] = Field(
        default_factory=lambda: [DistillConfig(alpha=0.7, temperature=2.0)],
        description="with lr 'auto' and distillation on: other (alpha, temperature) pairs probed with "
        "every lr factor; the best on the held-out images is used ([]: distill as given)",
    )
    holdout_images: int = Field(
        5000,
        ge=0,
        description="training images held out (never the calibration or validation images; at most a fifth "
        "of the training set; the train stage leaves them out too) to score the starting model and each "
        "checkpoint; the best is kept, so the result is never worse there than the start (0: keep the last "
        "checkpoint)",
    )
    holdout_evals_per_epoch: int = Field(4, ge=1, description="checkpoints scored on the hold-out per epoch")
    holdout_confidence: float = Field(
        0.95,
        ge=0.0,
        lt=1.0,
        description="a checkpoint replaces the starting model only if a paired (McNemar) test on the "
        "held-out images says it is better with this confidence (0: any gain in top-1 is enough)",
    )

    @field_validator("lr", mode="before")
    @classmethod
    def _lr_number_or_auto(cls, value: Any) -> Any:
        """One clear message for both halves of the union (a number > 0, or 'auto')."""
        if isinstance(value, str) and value.strip().lower() == "auto":
            return "auto"
        try:
            number = float(value)
        except (TypeError, ValueError):
            number = float("nan")
        if not number > 0:
            raise ValueError(f"must be a number > 0 or 'auto', got {value!r}")
        return number


def parse_budget(value: Any) -> Any:
    """'50%' -> 0.5 (a fraction of the base model); '3.2e8' or 320000000 -> absolute count."""
    if value is None or isinstance(value, (int, float)):
        return value
    s = str(value).strip()
    m = re.fullmatch(r"([0-9]*\.?[0-9]+)\s*%", s)
    if m:
        return float(m.group(1)) / 100.0
    try:
        return float(s)
    except ValueError as exc:
        raise ValueError(f"expected a percentage like '50%' or a count, got {value!r}") from exc


def parse_latency(value: Any) -> tuple[str, float]:
    """A latency budget: '2.5ms' -> ('ms', 2.5); '50%' or 0.5 -> ('fraction', 0.5) of the base."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if 0 < float(value) <= 1:
            return "fraction", float(value)
    else:
        text = str(value).strip().lower()
        m = re.fullmatch(r"([0-9]*\.?[0-9]+(?:e-?[0-9]+)?)\s*(ms|%)", text)
        if m:
            v = float(m.group(1))
            if m.group(2) == "ms" and v > 0:
                return "ms", v
            if m.group(2) == "%" and 0 < v <= 100:
                return "fraction", v / 100.0
    raise ValueError(
        f"a latency budget is milliseconds ('2.5ms') or a fraction of the base model's measured "
        f"latency ('50%'), got {value!r}"
    )


def _latency_text(value: Any) -> Any:
    if value is None:
        return None
    parse_latency(value)
    return str(value).strip() if not isinstance(value, (int, float)) else f"{100 * float(value):g}%"


def _known_backend(name: Optional[str]) -> Optional[str]:
    return None if name is None else _known_backends([name])[0]


def _known_backends(names: list[str]) -> list[str]:
    from gslim.runtime import BACKENDS  # the one registry of runtimes (no runtime is imported)

    for name in names:
        if name not in BACKENDS:
            raise ValueError(f"unknown backend {name!r}; choose from {', '.join(BACKENDS)}")
    return names


def _known_criterion(name: str) -> str:
    from gslim.compress.select import CRITERIA  # the one registry of selection criteria

    if name not in CRITERIA:
        raise ValueError(f"unknown criterion {name!r}; choose one of {', '.join(CRITERIA)}")
    return name


class LatencyConfig(_Section):
    """Where a latency budget is measured; unset values come from the recipe's profile section."""

    backend: Optional[str] = Field(
        None,
        description="runtime timed (default: profile.backends[0] if it is an "
        "ONNX or torch backend, else ort-cpu); torch-cuda is timed as CUDA graphs",
    )
    batch: Optional[int] = Field(None, ge=1, description="batch size timed (default: profile.batch_sizes[0])")
    threads: Optional[int] = Field(None, ge=1, description="CPU threads (default: profile.threads)")
    precision: Optional[Literal["fp32", "fp16"]] = Field(None, description="default: fp16 when profile.fp16")
    grid: int = Field(8, ge=2, le=64, description="widths timed per unit for the latency table")
    table: Optional[str] = Field(
        None,
        description="latency table JSON to use and extend (default: the cache "
        "under ~/.cache/gslim/latency, keyed by device and runtime)",
    )
    max_rounds: int = Field(
        3, ge=1, le=10, description="closed loop: measure, tighten, reselect at most this often"
    )
    tolerance: float = Field(
        0.03, ge=0.0, le=0.5, description="measured latency may exceed the budget by this fraction (noise)"
    )
    undershoot: float = Field(
        0.05, ge=0.0, le=0.9, description="a slim model this fraction (or more) under the budget is widened"
    )
    macs_weight: float = Field(
        0.1,
        ge=0.0,
        le=10.0,
        description="among allocations of near-least greedy error, prefer MACs kept: 0.1 trades 1% of "
        "the error for 10% of the MACs (0: least error only)",
    )

    _backend = field_validator("backend")(_known_backend)


class CompressConfig(_Section):
    criterion: str = "greedy"
    device: Literal["auto", "cpu", "cuda"] = Field(
        "cpu",
        description="where selection runs: the statistics, the OMP and the re-fit stay on this device "
        "(float64 sums, TF32 off on CUDA); under torchrun a CUDA selection uses NCCL and each rank its "
        "LOCAL_RANK GPU",
    )
    eps: Optional[float] = Field(None, gt=0.0, lt=1.0, description="per-unit relative discrepancy tolerance")
    target_macs: Optional[float] = Field(
        None, gt=0.0, description="fraction (<=1, from '50%') or absolute MACs of the compressed model"
    )
    target_params: Optional[float] = Field(None, gt=0.0)
    target_latency: Optional[str] = Field(
        None,
        description="milliseconds ('2.5ms') or a fraction of the base's measured latency ('50%') on "
        "compress.latency.backend",
    )
    latency: LatencyConfig = Field(default_factory=LatencyConfig)
    allocation: Optional[Literal["eps", "knapsack"]] = Field(
        None,
        description="how widths meet the budget: one error tolerance for all units (eps) or the least "
        "total greedy error within the budget (knapsack, the default)",
    )
    round_to: int = Field(8, ge=1)
    min_width: int = Field(8, ge=1)
    bn_recalib: bool = True
    prune_residual: bool = Field(False, description="also prune residual-coupled stage widths")
    ridge: float = Field(1e-2, ge=0.0, description="ridge, relative to the mean feature energy")
    max_positions: int = Field(
        200_000, ge=1000, description="spatial positions sampled per unit for the greedy statistics"
    )
    omp_precision: Literal["float32", "float64"] = Field(
        "float32", description="greedy: the selection path's arithmetic (statistics and re-fit: float64)"
    )
    loss_batch: int = Field(64, ge=1, description="greedy-loss: calibration images scoring each candidate")
    loss_candidates: Optional[int] = Field(
        50, ge=1, description="greedy-loss: candidates per step (null: n/k ln 100)"
    )
    loss_rescale: bool = Field(
        True, description="greedy-loss: kept channels x width/kept (published); false: 0/1"
    )
    seed: Optional[int] = None

    _pct = field_validator("target_macs", "target_params", mode="before")(parse_budget)
    _criterion = field_validator("criterion")(_known_criterion)
    _latency = field_validator("target_latency", mode="before")(_latency_text)

    @field_validator("target_macs", "target_params")
    @classmethod
    def _fraction_le_one(cls, v: Optional[float]) -> Optional[float]:
        if v is not None and 1.0 < v < 1000:
            raise ValueError("a fraction must be at most 100% (absolute counts must be >= 1000)")
        return v

    @model_validator(mode="after")
    def _one_budget(self) -> "CompressConfig":
        budgets = ("eps", "target_macs", "target_params", "target_latency")
        given = [n for n in budgets if getattr(self, n) is not None]
        if len(given) > 1:
            raise ValueError(f"give one of {', '.join(budgets)} (got {', '.join(given)})")
        if self.round_to > 1 and self.min_width % self.round_to and self.min_width > self.round_to:
            raise ValueError("min_width must be a multiple of round_to")
        return self


class ExportConfig(_Section):
    opset: Optional[int] = Field(
        None, ge=11, le=23, description="ONNX opset; <=17 uses the TorchScript exporter"
    )
    dynamic_batch: bool = True
    fp16_onnx: bool = False
    engine: bool = False
    precision: Literal["fp32", "fp16", "int8"] = "fp16"
    tolerance: float = Field(
        1e-4, gt=0.0, description="FP32 ONNX parity: max |ONNX Runtime - PyTorch|, times max(1, max|logit|)"
    )
    fp16_tolerance: float = Field(1e-2, gt=0.0, description="FP16 ONNX parity, times max(1, max|logit|)")
    engine_tolerance: Optional[float] = Field(
        None,
        gt=0.0,
        description="engine vs ONNX Runtime, relative; null = per precision (fp32 1e-3, fp16 2e-2)",
    )
    parity_images: int = Field(256, ge=1)
    int8: bool = Field(False, description="also write a Q/DQ INT8 ONNX (model.int8.onnx), accuracy-gated")
    int8_calibration: Literal["minmax", "entropy", "percentile"] = Field(
        "minmax", description="how activation ranges are calibrated for the INT8 ONNX"
    )
    int8_calib_images: Optional[int] = Field(
        None, ge=1, description="calibration images for INT8 (default: data.calib_images, compress's subset)"
    )
    int8_max_top1_drop: float = Field(
        1.0, ge=0.0, description="INT8 export fails when its top-1 is this many points below FP32 PyTorch's"
    )
    int8_eval_images: int = Field(
        1000, ge=1, description="validation images the INT8 accuracy gate scores (labelled, no augmentation)"
    )
    min_batch: int = Field(1, ge=1)
    opt_batch: int = Field(8, ge=1)
    max_batch: int = Field(32, ge=1)
    workspace_mb: int = Field(2048, ge=16)
    optimization_level: int = Field(3, ge=0, le=5)
    dla_core: Optional[int] = Field(None, ge=0)


class ProfileConfig(_Section):
    backends: list[str] = Field(default_factory=lambda: ["torch-cpu", "ort-cpu"])
    batch_sizes: list[int] = Field(default_factory=lambda: [1])
    threads: int = Field(1, ge=1)
    warmup_s: float = Field(1.0, ge=0.0)
    min_iters: int = Field(50, ge=1)
    min_seconds: float = Field(2.0, ge=0.0)
    rounds: int = Field(5, ge=1, description="interleaved rounds: base and compressed alternate")
    fp16: bool = False
    eval_images: Optional[int] = Field(
        None, ge=0, description="validation images scored per artifact (0: latency only, top-1 not measured)"
    )

    _backends = field_validator("backends")(_known_backends)

    @field_validator("batch_sizes")
    @classmethod
    def _positive(cls, v: list[int]) -> list[int]:
        if not v or any(b < 1 for b in v):
            raise ValueError("batch sizes must be a non-empty list of positive integers")
        return v


class Recipe(_Section):
    name: str = "run"
    seed: int = 0
    run_dir: Optional[str] = Field(None, description="defaults to runs/<name>")
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    train: Optional[TrainConfig] = Field(None, description="present only when the base model must be trained")
    compress: CompressConfig = Field(default_factory=CompressConfig)
    finetune: FinetuneConfig = Field(default_factory=FinetuneConfig)
    export: ExportConfig = Field(default_factory=ExportConfig)
    profile: ProfileConfig = Field(default_factory=ProfileConfig)
    sweep: Optional[list[Union[str, float]]] = Field(
        None,
        description="extra budgets for the trade-off plot, of the main budget's kind: MACs (['70%', '30%']) "
        "or, with compress.target_latency, latency (['70%', '2.5ms'])",
    )

    @model_validator(mode="after")
    def _sweep_kind(self) -> "Recipe":
        for b in self.sweep or []:
            if self.compress.target_latency is not None:
                parse_latency(b)
            else:
                parse_budget(b)
        return self

    def resolved_run_dir(self) -> Path:
        return Path(self.run_dir) if self.run_dir else Path("runs") / self.name


def format_validation_error(exc: ValidationError, source: str) -> str:
    """One line naming the first offending key (and how many more there are)."""
    errors = exc.errors()
    first = errors[0]
    loc = ".".join(_key_text(p) for p in first["loc"]) or "(top level)"
    msg = " ".join(first["msg"].split())  # one line, whatever a validator put in its message
    if first["type"] == "extra_forbidden":
        msg = "unknown key"
    elif first["type"] == "missing":
        msg = "required key is missing"
    msg = msg.removeprefix("Value error, ")
    more = f" (and {len(errors) - 1} more problem(s))" if len(errors) > 1 else ""
    return f"{source}: {loc}: {msg}{more}"


def _key_text(part: Any) -> str:
    """A key as it appears in an error: plain when it looks like a key, quoted (repr) otherwise,
    so a key with a dot, a space or a newline cannot break the message or be misread."""
    s = str(part)
    return s if re.fullmatch(r"[A-Za-z0-9_\-]+", s) else repr(part)


def parse_recipe(data: Any, source: str = "recipe") -> Recipe:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise GslimError(f"{source}: a recipe must be a YAML mapping of sections, got {type(data).__name__}")
    try:
        return Recipe.model_validate(data)
    except ValidationError as exc:
        raise GslimError(format_validation_error(exc, source)) from exc


def read_yaml(path: str | Path) -> Any:
    p = Path(path)
    if not p.is_file():
        raise GslimError(f"recipe not found: {p}")
    try:
        return yaml.safe_load(p.read_text())
    except yaml.YAMLError as exc:
        where = ""
        mark = getattr(exc, "problem_mark", None)
        if mark is not None:
            where = f" at line {mark.line + 1}, column {mark.column + 1}"
        problem = getattr(exc, "problem", None) or "invalid syntax"
        raise GslimError(f"{p} is not valid YAML{where}: {problem}") from exc
    except UnicodeDecodeError as exc:
        raise GslimError(f"{p} is not a text file") from exc


def load_recipe(path: str | Path | None, overrides: Optional[dict[str, Any]] = None) -> Recipe:
    """Read, override (dotted keys) and validate a recipe. ``path=None`` gives the defaults."""
    data = read_yaml(path) if path is not None else {}
    source = str(path) if path is not None else "defaults"
    if overrides and isinstance(data or {}, dict):  # parse_recipe refuses anything but a mapping
        data = apply_overrides(data or {}, overrides)
    return parse_recipe(data, source)


def apply_overrides(data: dict, overrides: dict[str, Any]) -> dict:
    """Return a copy of ``data`` with dotted keys set (``None`` values are skipped)."""
    import copy

    out = copy.deepcopy(data)
    for dotted, value in overrides.items():
        if value is None:
            continue
        node = out
        parts = dotted.split(".")
        for part in parts[:-1]:
            child = node.get(part)
            if child is None:
                child = {}
                node[part] = child
            if not isinstance(child, dict):
                raise GslimError(f"cannot set {dotted}: {part} is not a section")
            node = child
        node[parts[-1]] = value
    return out


def parse_set_options(items: Optional[list[str]]) -> dict[str, Any]:
    """Parse ``--set key.path=value`` options; values are YAML scalars (``5``, ``true``, ``50%``)."""
    out: dict[str, Any] = {}
    for item in items or []:
        if "=" not in item:
            raise GslimError(f"--set expects KEY=VALUE (e.g. train.epochs=5), got {item!r}")
        key, raw = item.split("=", 1)
        try:
            out[key.strip()] = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError:
            out[key.strip()] = raw
    return out


def recipe_to_dict(recipe: Recipe) -> dict:
    return recipe.model_dump(mode="json")
