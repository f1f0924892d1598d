"""Fine-tuning keeps the best checkpoint on a held-out slice of the training data."""

from __future__ import annotations

import json

import pytest
import torch

from gslim.data import calibration_batch, make_dataset
from gslim.holdout import BestKeeper, eval_steps, holdout_split
from gslim.models import ModelSpec, build_model
from gslim.recipe import DataConfig, DistillConfig, FinetuneConfig
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


def _hits(n: int, correct: set[int]) -> torch.Tensor:
    t = torch.zeros(n, dtype=torch.bool)
    t[sorted(correct)] = True
    return t


def test_a_gain_of_a_few_images_does_not_replace_the_start():
    """The demo's failure: a checkpoint 3 images better on 2,000 held-out images (0.15 points) was
    kept and lost 0.65 points on the test set. With the paired test it must not replace the start,
    while a real gain does."""
    from gslim.holdout import paired_z, z_threshold

    n = 2000
    start = _hits(n, set(range(1700)))  # 85.00%
    # 33 images only the candidate gets right, 30 only the start does: +3 net, +0.15 points
    noisy = _hits(n, (set(range(1700)) - set(range(30))) | set(range(1700, 1733)))
    # 80 wins, 20 losses: +60 net, z = 6
    real = _hits(n, (set(range(1700)) - set(range(20))) | set(range(1700, 1780)))

    def point(step, hits):
        return {
            "epoch": step,
            "step": step,
            "holdout_top1": 100.0 * float(hits.float().mean()),
            "holdout_loss": 1.0,
        }

    model = torch.nn.Linear(2, 2)
    strict = BestKeeper(z_min=z_threshold(0.95))
    assert strict.offer(model, point(0, start), start)
    assert not strict.offer(model, point(1, noisy), noisy)
    assert strict.history[-1]["wins"] == 33 and strict.history[-1]["losses"] == 30
    assert strict.offer(model, point(2, real), real)
    assert strict.best["step"] == 2 and strict.best["z"] == pytest.approx(6.0)
    # the old rule (no test) kept the noisy one
    loose = BestKeeper(z_min=z_threshold(0.0))
    assert loose.offer(model, point(0, start), start) and loose.offer(model, point(1, noisy), noisy)
    assert paired_z(0, 0) == 0.0 and z_threshold(0.95) == pytest.approx(1.6449, abs=1e-3)
    # the bookkeeping survives a resume
    again = BestKeeper.from_state(strict.to_state(), z_threshold(0.95))
    assert torch.equal(again.start_correct, start)
    assert not again.offer(model, point(3, noisy), noisy)


def test_evaluate_returns_each_images_hit_in_order():
    from gslim.train import evaluate

    torch.manual_seed(0)
    x, y = torch.randn(37, 5), torch.randint(0, 3, (37,))
    model = torch.nn.Linear(5, 3)
    loader = [(x[i : i + 8], y[i : i + 8]) for i in range(0, 37, 8)]
    res = evaluate(model, loader, "cpu", per_image=True)
    expected = model(x).argmax(1).eq(y)
    assert torch.equal(res["correct"], expected)
    assert res["top1"] == pytest.approx(100.0 * float(expected.float().mean()))


def test_auto_lr_is_the_bases_lr_times_the_factor_and_records_the_gap():
    from gslim.train.finetune_lr import derive_finetune_lr

    ref = {"lr": 0.2, "optimizer": "sgd", "source": "the base checkpoint"}
    near = derive_finetune_lr(ref, "sgd", start_top1=85.0, teacher_top1=85.4, factor=0.5)
    assert near["lr"] == pytest.approx(0.2 * 0.5) and near["gap_points"] == pytest.approx(0.4)
    assert derive_finetune_lr(ref, "sgd", None, None, 0.5)["gap_points"] is None
    # an lr from another optimizer's scale is not reused
    other = derive_finetune_lr({"lr": 0.2, "optimizer": "sgd"}, "adamw", 85.0, 85.0, 0.5)
    assert other["reference_lr"] != 0.2 and "adamw" in other["reference_source"]


def test_finetune_with_auto_lr_derives_it_from_the_base_and_keeps_it_on_resume(tmp_path):
    from gslim.train.optim import scaled_lr

    spec = ModelSpec("mobilenet_v3_small", CLASSES, SIZE)
    teacher = _model()
    cfg = FinetuneConfig(epochs=2, device="cpu", holdout_evals_per_epoch=1)
    assert cfg.lr == "auto"
    ref = {"lr": 0.4, "optimizer": "sgd", "source": "test"}

    class Stop(Exception):
        pass

    def stop(epoch, _):
        if epoch == 1:
            raise Stop

    student = _model()
    with pytest.raises(Stop):
        fit(
            student,
            spec,
            cfg,
            _data(),
            tmp_path,
            teacher=teacher,
            progress=False,
            quiet=True,
            lr_reference=ref,
            on_epoch_end=stop,
        )
    first = json.loads((tmp_path / "train_log.jsonl").read_text().splitlines()[0])
    r = fit(
        _model(),
        spec,
        cfg,
        _data(),
        tmp_path,
        teacher=teacher,
        progress=False,
        quiet=True,
        lr_reference=ref,
        resume=True,
    )
    rule = r.metrics["selection"]["lr"]
    assert rule["reference_lr"] == 0.4 and rule["gap_points"] is not None
    assert rule["factor"] in cfg.lr_probe_factors and rule["lr"] == pytest.approx(0.4 * rule["factor"])
    # every factor with the recipe's distillation pair and with alpha 0.7, T 2 (the default probe)
    tried = [(p["factor"], p["alpha"], p["temperature"]) for p in rule["probe"]["points"]]
    assert tried == [(f, a, t) for f in cfg.lr_probe_factors for a, t in ((0.5, 4.0), (0.7, 2.0))]
    assert r.metrics["selection"]["teacher_holdout_top1"] is not None
    peak = scaled_lr(rule["lr"], 16)
    assert 0 < first["lr"] <= peak  # the schedule ran from the derived peak, before and after the resume
    from gslim.models import load_model

    _, saved = load_model(tmp_path / "model.pt")
    assert (
        saved.meta["train"]["lr"] == pytest.approx(rule["lr"]) and saved.meta["train"]["optimizer"] == "sgd"
    )


def test_the_base_never_trains_on_the_finetunes_held_out_slice():
    """The slice must be unseen by the base (and so by the model compressed from it): a slice the
    base trained on rewards what it memorised and keeps the start against real gains."""
    from gslim.recipe import TrainConfig
    from gslim.train.selection import training_split

    data, spec = _data(), ModelSpec("mobilenet_v2", CLASSES, SIZE)
    held = holdout_split(data, SIZE, CLASSES, 0, 24)
    split, train = training_split(TrainConfig(), data, spec, 0, print, reserve=24)
    assert split is None and len(train) == 160 - 24
    assert not set(train.indices) & set(held.indices)
    _, everything = training_split(TrainConfig(), data, spec, 0, print)  # nothing reserved
    assert len(everything) == 160
    # the fine-tune holds out (and selects on) exactly that slice
    ft_split, ft_train = training_split(FinetuneConfig(holdout_images=24), data, spec, 0, print)
    assert ft_split.indices == held.indices and ft_train.indices == train.indices


@pytest.mark.parametrize("bad", ["abc", "-1", 0, "0"])
def test_a_bad_finetune_lr_is_one_clear_message(bad):
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="must be a number > 0 or 'auto'") as err:
        FinetuneConfig(lr=bad)
    assert err.value.error_count() == 1
    assert FinetuneConfig(lr="0.05").lr == 0.05 and FinetuneConfig(lr=" Auto ").lr == "auto"


def test_auto_lr_probe_picks_the_factor_that_scores_best_and_leaves_no_trace(tmp_path):
    """A factor that blows the model up loses the probe; the probe's steps leave nothing behind:
    the fine-tune that follows is bit for bit the one at the chosen lr without a probe."""
    spec = ModelSpec("mobilenet_v3_small", CLASSES, SIZE)
    ref = {"lr": 1.0, "optimizer": "sgd", "source": "test"}

    teacher = _model()

    def finetune(factors, out, **kw):
        cfg = FinetuneConfig(
            epochs=1, device="cpu", holdout_evals_per_epoch=1, lr_probe_factors=factors, **kw
        )
        model = _model()
        r = fit(model, spec, cfg, _data(), out, teacher=teacher, progress=False, quiet=True, lr_reference=ref)
        return model, r.metrics["selection"]["lr"]

    pairs = [DistillConfig(alpha=0.7, temperature=2.0), DistillConfig(alpha=0.2, temperature=1.0)]
    probed, rule = finetune([2000.0, 0.05], tmp_path / "probed", distill_probe=pairs)
    assert rule["factor"] == 0.05 and rule["lr"] == pytest.approx(0.05)
    points = rule["probe"]["points"]
    assert rule["probe"]["steps"] == 8
    # every factor with every distillation pair (the recipe's first), from the same start
    tried = [(p["factor"], p["alpha"], p["temperature"]) for p in points]
    assert tried == [(f, a, t) for f in (2000.0, 0.05) for a, t in ((0.5, 4.0), (0.7, 2.0), (0.2, 1.0))]
    assert max(p["holdout_loss"] for p in points[3:]) < min(p["holdout_loss"] for p in points[:3])
    chosen_pair = (rule["distill"]["alpha"], rule["distill"]["temperature"])
    best = next(p for p in points[3:] if (p["alpha"], p["temperature"]) == chosen_pair)
    chosen = DistillConfig(alpha=best["alpha"], temperature=best["temperature"])
    plain, plain_rule = finetune([0.05], tmp_path / "plain", distill=chosen)
    assert "probe" not in plain_rule and "distill" not in plain_rule and plain_rule["lr"] == rule["lr"]
    for name, tensor in plain.state_dict().items():
        assert torch.equal(tensor, probed.state_dict()[name]), name


def test_a_resumed_finetune_distils_with_the_pair_its_probe_chose():
    from types import SimpleNamespace

    from gslim.train.finetune_lr import apply_lr_rule

    cfg = FinetuneConfig()
    rule = {"lr": 0.1, "distill": {"alpha": 0.7, "temperature": 2.0}}
    run = SimpleNamespace(
        lr_rule=rule, cfg=cfg, distill=cfg.distill, data=SimpleNamespace(batch_size=128),
        info=SimpleNamespace(world_size=2),
    )  # fmt: skip
    apply_lr_rule(run)
    assert (run.distill.alpha, run.distill.temperature) == (0.7, 2.0) and run.peak_lr == pytest.approx(0.1)
    assert (cfg.distill.alpha, cfg.distill.temperature) == (0.5, 4.0)  # the recipe itself is unchanged


def test_another_distillation_pair_replaces_the_recipes_only_when_clearly_better():
    """The top of six noisy probe scores is not followed: another pair must beat the recipe's best
    factor on a paired test over the same held-out images, as a checkpoint must beat the start."""
    from gslim.train.finetune_lr import _followed_probe

    n = 5000

    def hits(right: int, wins: int = 0, losses: int = 0) -> torch.Tensor:
        """The first ``right`` images right, then ``losses`` of them wrong and ``wins`` others right."""
        h = torch.zeros(n, dtype=torch.bool)
        h[:right] = True
        h[:losses] = False
        h[right : right + wins] = True
        return h

    def probe(pair: int, h: torch.Tensor) -> dict:
        top1 = 100.0 * float(h.float().mean())
        return {"pair": pair, "holdout_top1": top1, "holdout_loss": 1.0 - top1 / 100}

    # the recipe's pair at two factors, another pair at two factors; two fine-tunes from the same
    # start disagree on a few hundred images, whichever is better
    marks = [hits(3980), hits(3985), hits(3985, wins=105, losses=100), hits(3970)]
    probes = [probe(pair, h) for pair, h in zip((0, 0, 1, 1), marks)]
    assert _followed_probe(probes, marks, 0.95) == 1  # 5 images more of 5,000: noise
    assert _followed_probe(probes, marks, 0.0) == 2  # no test asked for: any gain
    marks[2] = hits(3985, wins=155, losses=100)  # 55 images more
    probes[2] = probe(1, marks[2])
    assert _followed_probe(probes, marks, 0.95) == 2 and probes[2]["z_against_recipe_pair"] > 3
    assert _followed_probe([probe(0, hits(10)), probe(0, hits(10))], [None, None], 0.95) == 0  # ties: earlier


def test_a_smaller_lr_factor_replaces_the_first_only_when_clearly_better():
    """A short probe favours a small lr; a few images' edge on the held-out slice does not move
    the fine-tune off the first factor (the demo's 30% model: 0.08x chosen on an edge of a few images
    ended 0.29 below its start on the test set, 0.5x gained 1.70)."""
    from gslim.train.finetune_lr import _followed_probe

    n = 5000

    def hits(start: int, wins: int, losses: int) -> torch.Tensor:
        h = torch.zeros(n, dtype=torch.bool)
        h[:start] = True
        h[:losses] = False
        h[start : start + wins] = True
        return h

    def probe(h: torch.Tensor) -> dict:
        top1 = 100.0 * float(h.float().mean())
        return {"pair": 0, "holdout_top1": top1, "holdout_loss": 1.0 - top1 / 100}

    # three factors from one start, each disagreeing with the first on a few hundred images
    marks = [hits(3900, 0, 0), hits(3900, 110, 100), hits(3900, 112, 100)]
    probes = [probe(h) for h in marks]
    assert _followed_probe(probes, marks, 0.95) == 0  # 12 images of 5,000: noise, the first stays
    assert probes[2]["z_against_first_factor"] < 1.645
    assert _followed_probe(probes, marks, 0.0) == 2  # no test asked for: the top
    marks[1] = hits(3900, 180, 100)  # 80 images more: a real difference
    probes[1] = probe(marks[1])
    assert _followed_probe(probes, marks, 0.95) == 1
