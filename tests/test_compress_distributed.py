"""Channel selection across torchrun ranks equals selection in one process on the same images."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from conftest import tiny_recipe_dict
from gslim.compress.shard import Shard
from gslim.errors import GslimError
from gslim.models import ModelSpec, build_model, load_model, save_checkpoint
from gslim.recipe import CompressConfig, load_recipe
from gslim.train.distributed import DistInfo

CASES = {
    # residual streams (whole-network passes per rank) and 3x3 consumers
    "resnet18": {"compress.target_macs": "50%", "compress.prune_residual": True},
    # SE squeeze re-fit (a second pass), a Linear head consumer, hardswish after consumers
    "mobilenet_v3_small": {"compress.target_macs": "60%"},
}


@pytest.mark.parametrize("arch", sorted(CASES))
def test_torchrun_selection_equals_one_process(tmp_path, arch):
    torch.manual_seed(0)
    base = tmp_path / "base.pt"
    save_checkpoint(build_model(arch, 4).eval(), ModelSpec(arch, 4, 32), base)
    over = {
        "model.arch": arch,
        "data.synthetic_train": 96,
        "data.calib_images": 64,  # 4 batches of 16: two per rank
        "run_dir": str(tmp_path / "one"),
        **CASES[arch],
    }
    recipe_path = tmp_path / "recipe.yaml"
    recipe_path.write_text(yaml.safe_dump(tiny_recipe_dict(over), sort_keys=False))

    from gslim.compress.stage import compress_stage

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each rank below: float32 kernels round by their thread blocking
    try:
        compress_stage(load_recipe(recipe_path), tmp_path / "one", model_path=base, progress=False)
    finally:
        torch.set_num_threads(threads)

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    env.pop("WORLD_SIZE", None)
    env["PYTHONPATH"] = (
        str(Path(__file__).resolve().parents[1] / "src") + os.pathsep + env.get("PYTHONPATH", "")
    )
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    cmd += ["-m", "gslim", "compress", str(recipe_path), "--model", str(base)]
    cmd += ["--run-dir", str(tmp_path / "two"), "--no-progress"]
    proc = subprocess.run(
        cmd, check=False, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("wrote ") == 1  # rank 0 alone writes and prints

    one = json.loads((tmp_path / "one" / "selection.json").read_text())
    two = json.loads((tmp_path / "two" / "selection.json").read_text())
    assert [u["order"] for u in two["units"]] == [u["order"] for u in one["units"]]
    assert two["calibration_ranks"] == 2 and one["calibration_ranks"] == 1
    assert any(u["kept"] < u["width"] for u in one["units"])
    m1, _ = load_model(tmp_path / "one" / "slim.pt")
    m2, _ = load_model(tmp_path / "two" / "slim.pt")
    s1, s2 = m1.state_dict(), m2.state_dict()
    assert s1.keys() == s2.keys()
    for k in s1:
        if s1[k].is_floating_point():  # re-fitted weights and BN statistics: sums in another order
            scale = float(s1[k].abs().max().clamp_min(1e-6))
            assert torch.allclose(s1[k], s2[k], rtol=1e-4, atol=1e-5 * scale), k
        else:
            assert torch.equal(s1[k], s2[k]), k


def test_too_few_batches_for_the_ranks_is_one_clear_error():
    shard = Shard(DistInfo(world_size=4, rank=1))
    with pytest.raises(GslimError, match="cannot be shared by 4 ranks"):
        shard.mine([torch.zeros(1)] * 3)
    assert shard.mine(list(range(9))) == [1, 5] and shard.global_index(1) == 5


def test_exact_sum_does_not_depend_on_the_order_of_the_terms():
    from gslim.compress.shard import ExactSum

    gen = torch.Generator().manual_seed(0)
    terms = [torch.randn(64, generator=gen, dtype=torch.float64) * 10.0 ** float(e) for e in range(-8, 9)]
    totals, plain = [], []
    for seed in range(5):
        order = torch.randperm(len(terms), generator=torch.Generator().manual_seed(seed)).tolist()
        total = ExactSum()
        for i in order:
            total.add(terms[i])
        totals.append(total.value())
        plain.append(sum(terms[i] for i in order))
    assert all(torch.equal(t, totals[0]) for t in totals)
    assert not all(torch.equal(p, plain[0]) for p in plain)  # what a plain float64 sum does


def test_selection_on_cuda_is_refused_in_one_line_without_a_gpu(make_recipe, run_cli, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present: the refusal is for machines without one")
    base = tmp_path / "base.pt"
    save_checkpoint(build_model("mobilenet_v2", 4).eval(), ModelSpec("mobilenet_v2", 4, 32), base)
    recipe = make_recipe({"compress.target_macs": "50%"})
    r = run_cli(["compress", recipe, "--model", str(base), "--no-progress", "--device", "cuda"])
    assert r.code == 3 and "CUDA was requested" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "run" / "slim.pt").exists()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
def test_selection_on_cuda_meets_the_budget_and_writes_a_cpu_model(make_recipe, tmp_path):
    from gslim.compress.stage import compress_stage

    base = tmp_path / "base.pt"
    torch.manual_seed(0)
    save_checkpoint(build_model("resnet18", 4).eval(), ModelSpec("resnet18", 4, 32), base)
    recipe = load_recipe(
        make_recipe({"model.arch": "resnet18", "compress.target_macs": "50%", "compress.device": "cuda"})
    )
    summary = compress_stage(recipe, tmp_path / "run", model_path=base, progress=False)
    assert summary["selection_device"].startswith("cuda") and summary["macs_fraction"] <= 0.5 + 1e-6
    model, _ = load_model(tmp_path / "run" / "slim.pt")
    assert next(model.parameters()).device.type == "cpu"
    with torch.no_grad():
        assert torch.isfinite(model(torch.randn(2, 3, 32, 32))).all()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
def test_compress_model_on_cuda_computes_its_statistics_without_tf32(monkeypatch):
    import gslim.compress.select as sel

    seen = []
    real = sel.find_units  # called once, before any statistics

    def spy(*args, **kwargs):
        seen.append((torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32))
        return real(*args, **kwargs)

    monkeypatch.setattr(sel, "find_units", spy)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", True)
    model = build_model("mobilenet_v2", 4).eval().cuda()
    res = sel.compress_model(
        model, 32, torch.randn(16, 3, 32, 32, device="cuda"), None, CompressConfig(target_macs=0.5)
    )
    assert seen == [(False, False)] and torch.backends.cudnn.allow_tf32 is True and res.widths


def _held_maps_rank(rank: int, port: int, maps: list, queue) -> None:
    import torch.distributed as dist
    from torch import nn

    from gslim.compress.sums import HeldMaps

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        torch.manual_seed(0)
        conv = nn.Conv2d(5, 3, 3, padding=1)
        held = HeldMaps(conv, Shard(DistInfo(world_size=2, rank=rank)))
        for x, y in maps[rank::2]:  # rank r holds every other batch's held-out images
            held.add(x, y)
        held.reduce()
        W = conv.weight.detach().double()[:, [0, 3]].reshape(3, -1).T
        queue.put((rank, held.rows, held.yy, held.error([0, 3], W)))
    finally:
        dist.destroy_process_group()


def test_held_out_maps_sum_their_error_across_ranks_as_one_process_does():
    """A dense consumer's held-out images stay on the rank that ran them (sums.HeldMaps): the
    error of given weights is summed across ranks to what one process holding them all gets."""
    import socket

    import torch.multiprocessing as mp
    from torch import nn

    from gslim.compress.sums import HeldMaps

    gen = torch.Generator().manual_seed(1)
    maps = [
        (torch.randn(2, 5, 6, 6, generator=gen), torch.randn(2, 3, 6, 6, generator=gen)) for _ in range(4)
    ]
    maps[3] = (maps[3][0][:0], maps[3][1][:0])  # (a batch with no held-out image adds nothing)
    torch.manual_seed(0)
    conv = nn.Conv2d(5, 3, 3, padding=1)
    one = HeldMaps(conv, Shard())
    for x, y in maps[:3]:
        one.add(x, y)
    one.reduce()
    W = conv.weight.detach().double()[:, [0, 3]].reshape(3, -1).T
    want = (one.rows, one.yy, one.error([0, 3], W))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_held_maps_rank, args=(r, port, maps, queue)) for r in range(2)]
    for p in procs:
        p.start()
    got = sorted(queue.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(60)
    assert all(p.exitcode == 0 for p in procs)
    for _, rows, yy, err in got:
        assert (rows, yy, err) == want
