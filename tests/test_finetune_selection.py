"""Fine-tuning keeps the best checkpoint on a held-out slice of the training data."""

from __future__ import annotations

import json

import pytest
import torch

from gslim.data import calibration_batch, make_dataset
from gslim.holdout import BestKeeper, eval_steps, holdout_split
from gslim.models import ModelSpec, build_model
from gslim.recipe import DataConfig, FinetuneConfig
from gslim.train import fit

SIZE, CLASSES = 32, 4


def _data(**kw) -> DataConfig:
    return DataConfig(
        kind="synthetic",
        synthetic_train=kw.pop("train", 160),
        synthetic_val=48,
        batch_size=16,
        workers=0,
        calib_images=kw.pop("calib", 32),
        **kw,
    )


def test_holdout_is_disjoint_from_calibration_and_validation():
    data = _data()
    split = holdout_split(data, SIZE, CLASSES, 0, 2000)
    assert split is not None and len(split.indices) == 160 // 5  # at most a fifth of the training set
    assert not set(split.indices) & set(split.calib_indices) and len(split.calib_indices) == 32
    assert len(split.train) + len(split.holdout) == 160 and not set(split.indices) & set(split.train.indices)
    # the calibration images compress uses are exactly the ones excluded
    calib_x, _ = calibration_batch(data, SIZE, CLASSES, 0)
    train = make_dataset(data, "train", SIZE, CLASSES, 0)
    from gslim.data import eval_view

    ev = eval_view(train)
    assert torch.equal(calib_x[0], ev[split.calib_indices[0]][0])
    held = torch.stack([split.holdout[i][0] for i in range(len(split.holdout))])
    val = torch.stack([x for x, _ in make_dataset(data, "val", SIZE, CLASSES, 0)])
    assert not any(torch.equal(h, v) for h in held[:8] for v in val)  # from the training split, not val
    assert holdout_split(_data(train=40, calib=40), SIZE, CLASSES, 0, 10) is None


def test_keeper_prefers_the_start_on_ties_and_restores():
    model = torch.nn.Linear(2, 2)
    k = BestKeeper()
    assert k.offer(model, {"epoch": 0, "step": 0, "holdout_top1": 50.0, "holdout_loss": 1.0})
    start = {n: p.clone() for n, p in model.state_dict().items()}
    with torch.no_grad():
        model.weight.add_(1.0)
    assert not k.offer(model, {"epoch": 1, "step": 5, "holdout_top1": 50.0, "holdout_loss": 1.0})  # a tie
    assert not k.offer(model, {"epoch": 2, "step": 9, "holdout_top1": 40.0, "holdout_loss": 0.5})
    k.restore(model)
    assert all(torch.equal(model.state_dict()[n], start[n]) for n in start)
    assert k.summary()["kept_start"] and k.summary()["points"] == 3
    assert eval_steps(10, 4) == {2, 5, 8, 10} and eval_steps(3, 8) == {1, 2, 3}


def _model():
    torch.manual_seed(0)
    return build_model("mobilenet_v3_small", CLASSES)


def test_a_finetune_that_only_hurts_returns_the_starting_weights(tmp_path):
    model = _model()
    start = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = FinetuneConfig(epochs=2, lr=1e4, device="cpu", distill=None, holdout_evals_per_epoch=2)
    r = fit(
        model,
        ModelSpec("mobilenet_v3_small", CLASSES, SIZE),
        cfg,
        _data(),
        tmp_path,
        progress=False,
        quiet=True,
        output_name="finetuned.pt",
    )
    sel = r.metrics["selection"]
    assert sel["kept_start"] and sel["kept"]["step"] == 0
    assert all(torch.equal(model.state_dict()[k], start[k]) for k in start)
    from gslim.models import load_model

    saved, spec = load_model(tmp_path / "finetuned.pt")
    assert all(torch.equal(saved.state_dict()[k], start[k]) for k in start)
    assert spec.meta["train"]["selection"]["kept_start"]


def test_resume_keeps_the_best_so_far(tmp_path):
    cfg = FinetuneConfig(epochs=3, lr=0.05, device="cpu", distill=None, holdout_evals_per_epoch=2)
    spec = ModelSpec("mobilenet_v3_small", CLASSES, SIZE)
    full = _model()
    fit(full, spec, cfg, _data(), tmp_path / "a", progress=False, quiet=True)
    log_a = [json.loads(x) for x in (tmp_path / "a" / "train_log.jsonl").read_text().splitlines()]

    class Stop(Exception):
        pass

    def stop_after_first(epoch, _):
        if epoch == 1:
            raise Stop

    part = _model()
    with pytest.raises(Stop):
        fit(
            part,
            spec,
            cfg,
            _data(),
            tmp_path / "b",
            progress=False,
            quiet=True,
            on_epoch_end=stop_after_first,
        )
    part = _model()
    r = fit(part, spec, cfg, _data(), tmp_path / "b", progress=False, quiet=True, resume=True)
    log_b = [json.loads(x) for x in (tmp_path / "b" / "train_log.jsonl").read_text().splitlines()]
    keys = ("holdout_top1", "holdout_best_top1", "holdout_best_step")
    assert [{k: x[k] for k in keys} for x in log_a] == [{k: x[k] for k in keys} for x in log_b]
    assert r.metrics["selection"]["points"] == 1 + 3 * 2  # the start, then two checkpoints an epoch
    assert all(torch.equal(full.state_dict()[k], part.state_dict()[k]) for k in full.state_dict())
