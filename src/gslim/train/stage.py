"""The train stage of a recipe: build (or load) its model and train it into ``base.pt``.

One implementation for ``gslim train`` and ``gslim run``, so both write the same artifacts:
``base.pt``, ``last.pt``, ``train_log.jsonl``, ``recipe.resolved.yaml`` and ``train_env.json``.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Optional

from gslim.recipe import Recipe, TrainConfig
from gslim.train.context import TrainResult
from gslim.train.distributed import env_int
from gslim.train.loop import fit
from gslim.train.precise_bn import has_batchnorm, refresh_base_statistics

RESOLVED_RECIPE = "recipe.resolved.yaml"
BASE_MODEL = "base.pt"


def write_resolved_recipe(recipe: Recipe, path: Path) -> Path:
    """The recipe as it was run (defaults and overrides applied), as YAML."""
    import yaml

    from gslim.artifacts import atomic_write
    from gslim.recipe import recipe_to_dict

    text = yaml.safe_dump(recipe_to_dict(recipe), sort_keys=False)
    return atomic_write(path, lambda tmp: tmp.write_text(text))


def base_model(recipe: Recipe):
    """The model that the train stage starts from, and its spec.

    A local checkpoint keeps its spec (and channel widths); torchvision weights or none build the
    recipe's architecture. The initial weights depend on the recipe's seed only.
    """
    from gslim.models import ModelSpec, build_model, load_model
    from gslim.train.distributed import seed_everything

    seed_everything(recipe.seed)
    m = recipe.model
    if m.weights is not None and Path(m.weights).is_file():
        model, spec = load_model(
            m.weights, expect_arch=m.arch, num_classes=m.num_classes, input_size=m.input_size
        )
        spec = ModelSpec(spec.arch, spec.num_classes, m.input_size, spec.widths, dict(spec.meta))
    else:
        model = build_model(m.arch, m.num_classes, m.weights)
        spec = ModelSpec(m.arch, m.num_classes, m.input_size)
    spec.meta = {**spec.meta, "recipe": recipe.name, "init": m.weights or "random"}
    return model, spec


def train_stage(
    recipe: Recipe,
    run_dir: Path,
    *,
    resume: bool = False,
    force: bool = False,
    progress: bool = True,
    command: str = "train",
) -> TrainResult:
    """Train the recipe's base model into ``run_dir/base.pt`` (distilling from ``train.distill.teacher``
    when the recipe names one). Works under torchrun; rank 0 writes the files."""
    from gslim.models import load_model
    from gslim.train.state import check_outputs

    cfg = recipe.train if recipe.train is not None else TrainConfig()
    check_outputs(run_dir, force=force, resume=resume, output_name=BASE_MODEL)
    model, spec = base_model(recipe)
    teacher = None
    if cfg.distill is not None and cfg.distill.teacher:
        teacher, _ = load_model(cfg.distill.teacher, num_classes=recipe.model.num_classes)

    def record_run(start_epoch: int) -> None:  # rank 0, once the run (or resume) is validated
        from gslim.artifacts import save_json
        from gslim.environment import ensure_run_dir, environment_info, resolve_device

        ensure_run_dir(run_dir)
        write_resolved_recipe(recipe, run_dir / RESOLVED_RECIPE)
        env = environment_info(str(resolve_device(cfg.device)))
        env.update(
            {
                "seed": recipe.seed,
                "world_size": int(os.environ.get("WORLD_SIZE", "1") or 1),
                "command": command,
                "resumed_after_epoch": start_epoch,
            }
        )
        save_json(env, run_dir / "train_env.json")

    result = fit(
        model,
        spec,
        cfg,
        recipe.data,
        run_dir,
        seed=recipe.seed,
        teacher=teacher,
        resume=resume,
        force=force,
        output_name=BASE_MODEL,
        progress=progress,
        on_start=record_run,
        # the fine-tune will select on this slice: the base must not have seen it
        reserve_holdout=recipe.finetune.holdout_images if recipe.finetune is not None else 0,
    )
    if cfg.precise_bn_images and has_batchnorm(model) and env_int("RANK", 0) == 0:  # rank 0 writes base.pt
        info = refresh_base_statistics(model, result.final_path, recipe, cfg.precise_bn_images)
        result.metrics = {**result.metrics, **{k: info[k] for k in ("val_top1", "val_top5", "val_loss")}}
        result.metrics["precise_bn"] = info
        before = "?" if info["val_top1_before"] is None else f"{info['val_top1_before']:.2f}%"
        print(
            f"precise BN: BatchNorm statistics re-estimated on {info['images']} calibration images; "
            f"val top-1 {before} -> {info['val_top1']:.2f}%",
            file=sys.stderr,
            flush=True,
        )
    return result


def resolved_recipe_of(checkpoint: Path) -> Optional[Path]:
    """The ``recipe.resolved.yaml`` written next to a checkpoint by the train stage, if any."""
    path = Path(checkpoint).parent / RESOLVED_RECIPE
    return path if path.is_file() else None
