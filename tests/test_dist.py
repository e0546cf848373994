"""Data- and block-parallel pruning on torch.distributed (gloo, 2 processes started by torchrun).

The 2-rank runs must give what one process gives: the same masks, weights within floating-point
tolerance (data-parallel sums its windows' statistics and gradients in another order) or identical
(block-parallel runs the same operations on each block), and the same error measures.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import make_tiny_model, random_ids

from prunekit.checkpoint import Checkpointer
from prunekit.config import PruneConfig, set_leaf
from prunekit.dist import Ranks, choose_mode
from prunekit.errors import PrunekitError
from prunekit.pipeline import prune
from prunekit.reconstruct import FitData

HERE = Path(__file__).resolve().parent
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]

# n = 14 windows: 11 training and 3 held out (holdout 0.2); rank 0 holds 6 + 2, rank 1 holds 5 + 1,
# so every split is uneven, and a batch of 4 falls on the two ranks in varying shares
CASES = {
    "wanda-lr": {"n": 14, "seqlen": 8, "config": {"method": "wanda", "recon": "lr", "batch_size": 4}},
    "sparsegpt-lr": {"n": 14, "seqlen": 8, "config": {"method": "sparsegpt", "recon": "lr", "batch_size": 4}},
    "wanda-br-gp": {"n": 14, "seqlen": 8, "config": {
        "method": "wanda", "recon": "br-gp", "epochs": 3, "lr": 1e-3, "recon_batch_size": 4, "batch_size": 4,
        "holdout": 0.2, "guard": "revert"}},
    "wanda-br-gp-local": {"n": 14, "seqlen": 8, "config": {
        "method": "wanda", "recon": "br-gp", "epochs": 3, "lr": 1e-3, "recon_batch_size": 4, "batch_size": 4,
        "holdout": 0.2, "guard": "revert", "dp_batches": "local"}},
    "retrain-kd": {"n": 14, "seqlen": 8, "config": {
        "method": "wanda", "recon": "retrain", "retrain_loss": "kd", "epochs": 3, "lr": 1e-3, "recon_batch_size": 4,
        "batch_size": 4, "holdout": 0.2, "guard": "revert"}},
    "differing": {"n": 14, "seqlen": 8, "config": {"method": "wanda", "recon": "lr"}, "rank1_config": {"sparsity": "0.6"}},
    "free-lunch": {"n": 14, "seqlen": 8, "layers": 4, "config": {
        "method": "wanda", "recon": "free-lunch", "epochs": 2, "lr": 1e-3, "recon_batch_size": 4, "batch_size": 4,
        "holdout": 0.2, "guard": "revert"}},
}


def _single(spec: dict) -> tuple[dict, list]:
    cfg = PruneConfig()
    for key, value in spec["config"].items():
        set_leaf(cfg, key, value)
    model = make_tiny_model("llama", seed=0, layers=spec.get("layers", 3))
    model, report = prune(model, None, cfg, calib_ids=random_ids(spec["n"], spec["seqlen"], seed=1), progress=False)
    units = [(u.unit, u.calib_before, u.calib_after, u.heldout_before, u.heldout_after, u.steps) for u in report.units]
    return model.state_dict(), units


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> dict:
    """Every case run once on 2 ranks (one torchrun start for all: each start costs seconds)."""
    return _torchrun(tmp_path_factory.mktemp("dist"), CASES)


def _masks(state: dict) -> dict:
    return {k: v == 0 for k, v in state.items() if k.endswith("proj.weight")}


@pytest.mark.parametrize("case", ["wanda-lr", "sparsegpt-lr"])
def test_data_parallel_masks_match_one_process(two_ranks, case):
    state, _ = _single(CASES[case])
    got = two_ranks[case]["state"]
    assert _masks(state) and all(torch.equal(_masks(got)[k], m) for k, m in _masks(state).items())
    for k, v in state.items():  # Wanda keeps weights as they were; SparseGPT's update sums Hessians in another order
        assert torch.allclose(got[k], v, atol=1e-5, rtol=1e-4), k


def test_data_parallel_reconstruction_matches_one_process(two_ranks):
    state, units = _single(CASES["wanda-br-gp"])
    got = two_ranks["wanda-br-gp"]
    assert all(torch.equal(_masks(got["state"])[k], m) for k, m in _masks(state).items())
    moved = 0
    for k, v in state.items():
        assert torch.allclose(got["state"][k], v, atol=1e-5, rtol=1e-4), k
        moved += int(not torch.equal(v, make_tiny_model("llama", seed=0, layers=3).state_dict()[k]))
    assert moved > 10  # reconstruction changed the kept weights (not a trivially equal pair of LR runs)
    assert len(got["units"]) == len(units) == 3
    for (name, *errs), (name1, *errs1) in zip(got["units"], units):
        assert name == name1
        assert errs[-1] == errs1[-1]  # the same number of steps: the global batch is the single-process one
        for a, b in zip(errs[:-1], errs1[:-1]):  # held-out errors summed over ranks
            assert a == pytest.approx(b, rel=1e-4, abs=1e-7)
    assert got["guard"]["windows"] and len(got["guard"]["windows"]) == 3


def test_data_parallel_retraining_matches_one_process(two_ranks):
    """--recon retrain under torchrun: the single-process batches split over ranks, gradients summed,
    the kd teacher and the held-out loss over every rank's windows."""
    spec = CASES["retrain-kd"]
    cfg = PruneConfig()
    for key, value in spec["config"].items():
        set_leaf(cfg, key, value)
    model, report = prune(make_tiny_model("llama", seed=0, layers=3), None, cfg,
                          calib_ids=random_ids(spec["n"], spec["seqlen"], seed=1), progress=False)
    one, got = report.retrain.to_dict(), two_ranks["retrain-kd"]
    assert not one["reverted"] and not got["retrain"]["reverted"]  # training kept: the comparison is not of masks-only weights
    assert got["retrain"]["steps"] == one["steps"] == 9 and got["retrain"]["tokens"] == one["tokens"]
    for a, b in zip(got["retrain"]["heldout_curve"], one["heldout_curve"]):
        assert a == pytest.approx(b, rel=1e-4)
    assert got["retrain"]["loss_curve"] == pytest.approx(one["loss_curve"], rel=1e-4)
    dense = make_tiny_model("llama", seed=0, layers=3).state_dict()
    moved = 0
    for k, v in model.state_dict().items():
        assert torch.allclose(got["state"][k], v, atol=1e-5, rtol=1e-4), k
        moved += int(not torch.equal(v, dense[k]) and not k.endswith("proj.weight"))  # norms moved too
    assert moved >= 6


def test_local_batches_train_as_well_on_balanced_ranks(two_ranks):
    """--dp-batches local: the ranks ended identical (prune checks it), with the single-process step
    count, and another shuffle's weights but about the single-process held-out error."""
    state, units = _single(CASES["wanda-br-gp"])
    got = two_ranks["wanda-br-gp-local"]
    assert any(not torch.allclose(got["state"][k], v, atol=1e-5) for k, v in state.items())
    # block 0's masks come before any training; later blocks' depend on the reconstructed blocks before them
    assert all(torch.equal(_masks(got["state"])[k], m) for k, m in _masks(state).items() if ".layers.0." in k)
    for (name, _cb, _ca, hb, ha, steps), (name1, _cb1, _ca1, hb1, ha1, steps1) in zip(got["units"], units):
        assert (name, steps) == (name1, steps1) and hb == pytest.approx(hb1, rel=0.05)
        assert ha < hb and ha == pytest.approx(ha1, rel=0.25)


def test_block_parallel_free_lunch_is_the_sequential_model(two_ranks):
    state, units = _single(CASES["free-lunch"])
    got = two_ranks["free-lunch"]
    for k, v in state.items():
        assert torch.equal(got["state"][k], v), k
    assert [u[0] for u in got["units"]] == [u[0] for u in units]  # every block's units, gathered in block order
    assert got["units"] == units
    assert [w["window"] for w in got["guard"]["windows"]] == [0, 1, 2, 3]


def test_free_lunch_masks_are_the_layer_wise_passes():
    """Dense-input units are independent: their masks are those of the masks-only (LR) run, whatever
    reconstruction did to earlier blocks (which is what lets ranks take blocks in parallel)."""
    spec = {**CASES["free-lunch"], "config": {**CASES["free-lunch"]["config"], "holdout": 0}}  # LR holds none out
    lr, _ = _single({**spec, "config": {**spec["config"], "recon": "lr", "epochs": 0}})
    fl, _ = _single(spec)
    assert all(torch.equal(_masks(fl)[k], m) for k, m in _masks(lr).items())
    assert any(not torch.equal(fl[k], lr[k]) for k in lr)


def _torchrun(out: Path, cases: dict) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(HERE.parent / "src"), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([*TORCHRUN, str(HERE / "dist_worker.py"), str(out), json.dumps(cases)],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-10000:]
    return torch.load(out / "world2.pt")


def test_data_parallel_run_resumes_to_the_same_model(tmp_path, two_ranks):
    """Interrupted after window 1 and resumed on 2 ranks: rank 0 wrote the checkpoint (no streams: each
    rank holds its own windows), rank 1 read it, and the streams were replayed through the finished
    blocks; the model is the uninterrupted 2-rank run's, bit for bit. One rank may not resume it."""
    spec = {**CASES["wanda-br-gp"], "checkpoint": str(tmp_path / "ckpt")}
    first = _torchrun(tmp_path, {"run": {**spec, "stop_after": 1}})
    assert first["run"] is None and (tmp_path / "ckpt" / "state.json").is_file()
    assert not list((tmp_path / "ckpt").glob("streams.*"))
    with pytest.raises(PrunekitError, match="ran on 2 ranks and this one has 1; resume it with torchrun --nproc-per-node 2"):
        Checkpointer(tmp_path / "ckpt", "x", 1).load()
    resumed = _torchrun(tmp_path, {"run": spec})["run"]
    for k, v in two_ranks["wanda-br-gp"]["state"].items():
        assert torch.equal(resumed["state"][k], v), k
    assert resumed["units"] == two_ranks["wanda-br-gp"]["units"]


def test_block_parallel_run_resumes_to_the_sequential_model(tmp_path, two_ranks):
    """Block-parallel with a checkpoint: rank 1 hands each block it reconstructed to rank 0 as soon as
    it is final, so rank 0's checkpoint after window 1 holds block 1 as rank 1 trained it (and, at
    --checkpoint-every 0, the streams). Interrupted there and resumed on 2 ranks, the run ends with
    the uninterrupted one's model, records and guard verdicts: the sequential run's."""
    spec = {**CASES["free-lunch"], "config": {**CASES["free-lunch"]["config"], "checkpoint_every": 0},
            "layers": 4, "checkpoint": str(tmp_path / "ckpt")}
    first = _torchrun(tmp_path, {"run": {**spec, "stop_after": 1}})
    assert first["run"] is None and list((tmp_path / "ckpt").glob("streams.*"))
    saved = Checkpointer(tmp_path / "ckpt", "x", 2).load()
    assert saved["window"] == 1 and [u["unit"].split()[1] for u in saved["report"]["units"]][-1] == "1"  # rank 1's block
    resumed = _torchrun(tmp_path, {"run": spec})["run"]
    ref = two_ranks["free-lunch"]
    for k, v in ref["state"].items():
        assert torch.equal(resumed["state"][k], v), k
    assert resumed["units"] == ref["units"]
    assert resumed["guard"]["windows"] == ref["guard"]["windows"]


def test_streamed_block_parallel_run_is_the_sequential_model(tmp_path):
    """--weights stream in block-parallel mode: rank 0 writes each block to the output shards when it
    is final, rank 1's blocks included (they reach rank 0 when rank 1 finishes them); the saved
    model is the sequential run's, and the guard's end-to-end check compares the same models."""
    spec = {**CASES["free-lunch"], "layers": 4}
    state, units = _single(spec)
    make_tiny_model("llama", seed=0, layers=4).save_pretrained(tmp_path / "src", max_shard_size="20KB")
    paths = {"src": str(tmp_path / "src"), "out": str(tmp_path / "out"), "lr": str(tmp_path / "lr")}
    got = _torchrun(tmp_path, {"run": {**spec, "stream": paths}})["run"]
    for k, v in state.items():
        assert torch.equal(got["state"][k], v), k
    assert got["units"] == units
    assert got["guard"]["end_to_end"]["compared"]


def _fit_data(rank: int, world: int, total: int, local: bool) -> FitData:
    lo, hi = Ranks(rank, world).split(total)
    x = torch.zeros(hi - lo + 1, 1)
    return FitData(x, x, torch.arange(hi - lo), torch.tensor([hi - lo]), 4, torch.device("cpu"),
                   Ranks(rank, world, rank, "gloo") if world > 1 else Ranks(), lo, total, local)


def test_global_batches_are_the_single_process_batches_split_by_rank():
    single = _fit_data(0, 1, 11, False).batches(4, torch.Generator().manual_seed(5))
    parts = [_fit_data(r, 3, 11, False).batches(4, torch.Generator().manual_seed(5)) for r in range(3)]
    offsets = [Ranks(r, 3).split(11)[0] for r in range(3)]
    for k, (rows, size) in enumerate(single):
        assert [p[k][1] for p in parts] == [size] * 3  # every rank knows the global batch's size
        held = sorted(int(i) + off for p, off in zip(parts, offsets) for i in p[k][0])  # local -> global rows
        assert held == sorted(rows.tolist())


def test_local_batches_are_balanced_and_cover_every_window_once():
    parts = [_fit_data(r, 2, 11, True).batches(4, torch.Generator().manual_seed(5)) for r in range(2)]
    assert len(parts[0]) == len(parts[1]) == 3  # the single-process step count
    for r, p in enumerate(parts):
        lo, hi = Ranks(r, 2).split(11)
        assert sorted(int(i) for rows, _ in p for i in rows) == list(range(hi - lo))
    for (a, size_a), (b, size_b) in zip(*parts):
        assert size_a == size_b == len(a) + len(b) and abs(len(a) - len(b)) <= 1
    again = _fit_data(0, 2, 11, True).batches(4, torch.Generator().manual_seed(5))
    assert all(torch.equal(x, y) for (x, _), (y, _) in zip(again, parts[0]))  # seeded


def test_settings_that_differ_between_ranks_are_refused_at_start(two_ranks):
    assert "the settings differ between ranks (rank 0 vs rank 1)" in two_ranks["differing"]["error"]


def test_streamed_data_parallel_run_is_the_in_memory_one(tmp_path, two_ranks):
    """--weights stream on 2 ranks: each reads blocks from the shards, rank 0 writes the output and the
    masks-only copies, the other reads what rank 0 committed for the guard's end-to-end walk."""
    make_tiny_model("llama", seed=0, layers=3).save_pretrained(tmp_path / "src", max_shard_size="20KB")
    paths = {"src": str(tmp_path / "src"), "out": str(tmp_path / "out"), "lr": str(tmp_path / "lr")}
    got = _torchrun(tmp_path, {"run": {**CASES["wanda-br-gp"], "stream": paths}})["run"]
    ref = two_ranks["wanda-br-gp"]
    for k, v in ref["state"].items():
        assert torch.equal(got["state"][k], v), k
    assert got["units"] == ref["units"]
    assert got["guard"]["end_to_end"]["compared"] and got["guard"]["end_to_end"] == ref["guard"]["end_to_end"]
    # interrupted after window 1 and resumed: rank 1 reads the finished blocks from rank 0's committed output
    spec = {**CASES["wanda-br-gp"], "stream": {k: v + "-2" for k, v in paths.items()}, "checkpoint": str(tmp_path / "ckpt")}
    spec["stream"]["src"] = paths["src"]
    assert _torchrun(tmp_path, {"run": {**spec, "stop_after": 1}})["run"] is None
    resumed = _torchrun(tmp_path, {"run": {**spec, "resume": True}})["run"]
    for k, v in ref["state"].items():
        assert torch.equal(resumed["state"][k], v), k


@pytest.mark.parametrize(("total", "world", "batch"), [(16, 8, 4), (10, 4, 2), (11, 2, 4), (9, 3, 8)])
def test_local_batches_spread_small_shares_over_the_steps(total, world, batch):
    """Ranks holding fewer windows than there are steps take theirs on different steps: every step
    is about one global batch (none empty), and each rank still uses each of its windows once."""
    parts = [_fit_data(r, world, total, True).batches(batch, torch.Generator().manual_seed(3)) for r in range(world)]
    steps = math.ceil(total / batch)
    assert all(len({b[1] for b in step}) == 1 for step in zip(*parts))  # every rank knows the step's size
    assert [p[0][1] for p in zip(*parts)] == [min(batch, total - k * batch) for k in range(steps)]  # the single-process sizes
    for step in zip(*parts):
        assert sum(len(rows) for rows, _ in step) == step[0][1]
        assert max(len(rows) for rows, _ in step) <= math.ceil(step[0][1] / world) + 1  # an even share each
    for r, p in enumerate(parts):
        lo, hi = Ranks(r, world).split(total)
        assert sorted(int(i) for rows, _ in p for i in rows) == list(range(hi - lo))


def test_mode_choice_and_refusals():
    two = Ranks(0, 2, 0, "gloo")
    assert choose_mode("auto", "dense", "local", 1, True, two) == "block"
    assert choose_mode("auto", "sparse", "global", 1, True, two) == "data"
    assert choose_mode("data", "dense", "local", 1, True, two) == "data"
    assert choose_mode("auto", "dense", "local", 1, True, Ranks()) == "single"
    with pytest.raises(PrunekitError, match="--parallel block needs units"):
        choose_mode("block", "sparse", "global", 1, True, two)
    assert Ranks(0, 2).split(11) == (0, 6) and Ranks(1, 2).split(11) == (6, 11)
    assert Ranks(1, 3).split(2) == (1, 2) and Ranks(2, 3).split(2) == (2, 2)


def test_torchrun_with_one_process_runs_the_distributed_path_to_the_same_model(tmp_path, model_dir, word_text):
    """``torchrun --nproc-per-node 1`` joins a process group of one (how the NCCL path is checked on one
    GPU) and gives the single-process model bit for bit."""
    from safetensors.torch import load_file

    args = ["-m", "prunekit", "prune", "--model", str(model_dir), "--calib", str(word_text), "--nsamples", "12",
            "--seqlen", "16", "--recon", "br-gp", "--epochs", "2", "--eval", "none"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for name, launcher in (("one", [sys.executable]), ("torchrun", [*TORCHRUN[:-1], "1"])):
        proc = subprocess.run([*launcher, *args, "--out", str(tmp_path / name)], capture_output=True, text=True, env=env, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
    metrics = json.loads((tmp_path / "torchrun" / "metrics.json").read_text())
    assert metrics["distributed"]["ranks"] == 1 and metrics["distributed"]["all_reduce_calls"] > 0
    a, b = load_file(tmp_path / "one" / "model.safetensors"), load_file(tmp_path / "torchrun" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_a_killed_rank_ends_the_job(tmp_path, model_dir, word_text):
    """SIGKILL one rank mid-run: the job ends within 60 s with an error, and no output is committed."""
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [*TORCHRUN, "-m", "prunekit", "prune", "--model", str(model_dir), "--calib", str(word_text),
           "--nsamples", "64", "--seqlen", "16", "--recon", "br-gp", "--epochs", "400", "--eval", "none",
           "--out", str(out), "--dist-timeout", "1"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 120
        victim = None
        while victim is None and time.time() < deadline:  # rank 1: a child of torchrun's agent running prunekit
            time.sleep(1)
            ps = subprocess.run(["ps", "-eo", "pid,ppid,args"], capture_output=True, text=True).stdout.splitlines()
            kids = [line.split(None, 2) for line in ps[1:] if line.split(None, 2)[1] == str(proc.pid)]
            if len(kids) == 2:
                env_of = {int(pid): Path(f"/proc/{pid}/environ").read_bytes() for pid, _pp, _a in kids}
                victim = next((pid for pid, e in env_of.items() if b"RANK=1\x00" in e.split(b"LOCAL_")[0] or b"\x00RANK=1\x00" in e), None)
        assert victim is not None, "the two ranks did not start"
        time.sleep(8)  # into the run
        assert proc.poll() is None, proc.stdout.read()
        os.kill(victim, signal.SIGKILL)
        t = time.time()
        output, _ = proc.communicate(timeout=60)
        assert time.time() - t < 60
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode != 0
    assert not out.exists()
    # rank 0 says it in one line (its collective failed, or torchrun stopped it)
    assert "prunekit: error: rank 0 lost the other ranks" in output or "prunekit: error: rank 0 was stopped by torchrun" in output, output[-3000:]
