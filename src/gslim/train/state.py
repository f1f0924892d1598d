"""The resumable training state (``last.pt``): what it holds, the RNG states that make a
resumed run bit-identical, the schedule a resume must share, and the output checks."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any, Optional

import torch

from gslim.artifacts import atomic_write, check_output_dir, json_line, load_torch, refuse_overwrite
from gslim.errors import GslimError
from gslim.holdout import BestKeeper
from gslim.models import ModelSpec
from gslim.recipe import DataConfig, TrainConfig
from gslim.train.distributed import unwrap

TRAIN_STATE_FORMAT = "gslim-train-state"
TRAIN_STATE_VERSION = 1


def rng_state() -> dict[str, Any]:
    """The global RNG states, as tensors (so ``torch.load(weights_only=True)`` accepts them)."""
    version, internal, gauss = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": torch.tensor(list(internal), dtype=torch.int64),
        "python_version": int(version),
        "python_gauss": gauss,
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }
    try:
        import numpy as np

        _, keys, pos, has_gauss, cached = np.random.get_state()
        state["numpy"] = torch.from_numpy(keys.astype("int64"))
        state["numpy_pos"], state["numpy_has_gauss"], state["numpy_gauss"] = (
            int(pos),
            int(has_gauss),
            float(cached),
        )
    except ImportError:  # pragma: no cover
        pass
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(
        (state["python_version"], tuple(int(v) for v in state["python"].tolist()), state["python_gauss"])
    )
    cuda = state.get("cuda") or []
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
    if "numpy" in state:
        try:
            import numpy as np

            np.random.set_state(
                (
                    "MT19937",
                    state["numpy"].numpy().astype("uint32"),
                    state["numpy_pos"],
                    state["numpy_has_gauss"],
                    state["numpy_gauss"],
                )
            )
        except ImportError:  # pragma: no cover
            pass


def schedule_signature(cfg: TrainConfig, data: DataConfig, world: int, steps_per_epoch: int) -> dict:
    """Settings that a resumed run must share with the interrupted one to continue its schedule."""
    return {
        "epochs": cfg.epochs,
        "optimizer": cfg.optimizer,
        "lr": cfg.lr,
        "warmup_epochs": cfg.warmup_epochs,
        "batch_size": data.batch_size,
        "world_size": world,
        "steps_per_epoch": steps_per_epoch,
    }


def load_train_state(path: Path, spec: ModelSpec, signature: dict) -> dict:
    state = load_torch(path)
    if not isinstance(state, dict) or state.get("format") != TRAIN_STATE_FORMAT:
        raise GslimError(f"{path} is not a gslim training state (written by fit); remove it or drop --resume")
    for key in ("model", "optimizer", "epoch", "step", "arch", "num_classes"):
        if key not in state:
            raise GslimError(f"{path} is missing its {key!r} entry (an old or damaged training state)")
    if state["arch"] != spec.arch or int(state["num_classes"]) != int(spec.num_classes):
        raise GslimError(
            f"{path} trains a {state['arch']} with {state['num_classes']} classes but this run is a "
            f"{spec.arch} with {spec.num_classes}; use another run directory or drop --resume"
        )
    if (state.get("widths") or None) != (dict(spec.widths) if spec.widths else None):
        raise GslimError(f"{path} holds a model of other channel widths than this run's; drop --resume")
    saved = state.get("signature") or {}
    changed = [f"{k} {saved[k]}->{v}" for k, v in signature.items() if k in saved and saved[k] != v]
    if changed:
        raise GslimError(
            f"cannot resume from {path}: the schedule changed ({', '.join(changed)}); "
            "rerun with the original settings, or without --resume to start over"
        )
    return state


def truncate_log(path: Path, last_epoch: int, last_metrics: Optional[dict] = None) -> None:
    """Keep only the log lines of epochs that the resumed state has completed. The state is
    written before its epoch's line is appended, so a run killed between the two lacks that
    line: it is put back from the state's own metrics (``last_metrics``)."""
    kept, epochs = [], set()
    for line in path.read_text().splitlines() if path.is_file() else []:
        if not line.strip():
            continue
        try:
            epoch = int(json.loads(line).get("epoch", 0))
        except (ValueError, AttributeError):
            continue
        if epoch <= last_epoch:
            kept.append(line)
            epochs.add(epoch)
    if last_metrics and last_metrics.get("epoch") == last_epoch and last_epoch not in epochs:
        kept.append(json_line(last_metrics))  # the line append_jsonl would have written
    if kept or path.is_file():
        atomic_write(path, lambda tmp: tmp.write_text("".join(k + "\n" for k in kept)))


# ----------------------------------------------------------------------------------------------
# data


def train_state(
    model,
    optimizer,
    scaler,
    spec: ModelSpec,
    epoch: int,
    step: int,
    seed: int,
    signature: dict,
    metrics: dict,
    keeper: Optional[BestKeeper] = None,
    lr_rule: Optional[dict] = None,
) -> dict:
    return {
        "holdout": keeper.to_state() if keeper is not None else None,
        "lr_rule": lr_rule,
        "format": TRAIN_STATE_FORMAT,
        "version": TRAIN_STATE_VERSION,
        "model": {k: v.detach().cpu().contiguous() for k, v in unwrap(model).state_dict().items()},
        "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict() if scaler.is_enabled() else None,
        "epoch": epoch,
        "step": step,
        "seed": seed,
        "signature": signature,
        "metrics": dict(metrics),
        "rng": rng_state(),
        "arch": spec.arch,
        "num_classes": int(spec.num_classes),
        "input_size": int(spec.input_size),
        "widths": {k: int(v) for k, v in spec.widths.items()} if spec.widths else None,
        "meta": spec.meta or {},
    }


def check_outputs(
    run_dir: Path,
    *,
    force: bool = False,
    resume: bool = False,
    output_name: str = "model.pt",
    last_name: str = "last.pt",
) -> None:
    """Refuse to replace a finished result, or an unfinished run's state with a fresh start."""
    run_dir = Path(run_dir)
    check_output_dir(run_dir, "run directory")  # before minutes of training, not after
    refuse_overwrite(run_dir / output_name, force, what="trained model")
    last_path = run_dir / last_name
    if last_path.is_file() and not resume and not force:
        raise GslimError(
            f"{last_path} holds an unfinished run; pass --resume to continue it or --force to start over"
        )
