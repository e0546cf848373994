"""Interrupted runs continue from their checkpoint and end with the same model; same seed, same model."""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny_model, random_ids

import prunekit
from prunekit.checkpoint import Checkpointer, _load_tensors, _save_tensors, pack, unpack
from prunekit.config import PruneConfig

CALIB = random_ids(6, 16, seed=11)


class Killed(Exception):
    pass


def _cfg(recon: str, method: str) -> PruneConfig:
    cfg = PruneConfig(batch_size=2, device="cpu")
    cfg.sparsity.method = method
    cfg.recon.recon = recon
    if recon != "lr":
        cfg.recon.epochs = 2
        cfg.recon.lr = 1e-2
    return cfg


def _state(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize(("recon", "method", "every"), [
    ("lr", "sparsegpt", 10.0), ("br-gp", "wanda", 10.0), ("br-gp-cr", "magnitude", 10.0), ("br-gp-cr", "wanda", 0.0),
    ("br-gp", "sparsegpt", 0.0),
])
def test_killed_run_resumes_to_the_same_model(tmp_path, recon, method, every):
    """``every`` 10 minutes: no streams are saved in so short a run, the resumed run replays them from
    block 0's inputs; 0: they are saved after every window."""
    reference, ref_report = prunekit.prune(make_tiny_model("llama", layers=3), None, _cfg(recon, method), calib_ids=CALIB, progress=False)

    def kill_after_second_window(k: int) -> None:
        if k == 1:
            raise Killed

    ckpt = Checkpointer(tmp_path, fingerprint="x")
    cfg = _cfg(recon, method)
    cfg.checkpoint_every = every
    with pytest.raises(Killed):
        prunekit.prune(make_tiny_model("llama", layers=3), None, cfg, calib_ids=CALIB,
                       progress=False, checkpoint=ckpt, on_window=kill_after_second_window)
    saved = sorted(p.name for p in tmp_path.glob("streams.*"))
    assert saved == (["streams.w1.safetensors"] if every == 0 else [])
    finished = []
    resumed, report = prunekit.prune(make_tiny_model("llama", layers=3), None, _cfg(recon, method), progress=False,
                                     checkpoint=Checkpointer(tmp_path, fingerprint="x"), on_window=finished.append)
    assert finished[0] == 2  # windows 0 and 1 were not run again
    a, b = _state(reference), _state(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert report.per_layer == ref_report.per_layer
    assert len(report.units) == len(ref_report.units)
    if recon != "lr":  # the guard's masks-only weights come back from the checkpoint: same verdicts
        assert report.guard.end_to_end == ref_report.guard.end_to_end and report.guard.end_to_end["compared"]
        assert report.guard.windows == ref_report.guard.windows


@pytest.mark.parametrize("recon", ["br-gp", "br-gp-cr"])
def test_streams_saved_windows_ago_are_replayed_through_the_finished_blocks(tmp_path, recon):
    """Streams saved after window 0 only; the run stops after window 2 of 4 (5 for cross-block
    windows), and the resumed run replays the streams from block 1 through the finished blocks."""
    cfg = _cfg(recon, "sparsegpt")
    reference, ref_report = prunekit.prune(make_tiny_model("llama", layers=4), None, cfg, calib_ids=CALIB, progress=False)

    def kill_at(n: int):
        def on_window(k: int) -> None:
            if k == n:
                raise Killed
        return on_window

    cfg.checkpoint_every = 0.0
    with pytest.raises(Killed):
        prunekit.prune(make_tiny_model("llama", layers=4), None, cfg, calib_ids=CALIB, progress=False,
                       checkpoint=Checkpointer(tmp_path, fingerprint="x"), on_window=kill_at(0))
    cfg.checkpoint_every = 10.0
    with pytest.raises(Killed):
        prunekit.prune(make_tiny_model("llama", layers=4), None, cfg, progress=False,
                       checkpoint=Checkpointer(tmp_path, fingerprint="x"), on_window=kill_at(2))
    state = Checkpointer(tmp_path, fingerprint="x").load()
    assert state["window"] == 2 and state["streams"]["pos"] == 0 and state["pos"] == (2 if recon == "br-gp" else 1)
    resumed, report = prunekit.prune(make_tiny_model("llama", layers=4), None, cfg, progress=False,
                                     checkpoint=Checkpointer(tmp_path, fingerprint="x"))
    a, b = _state(reference), _state(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [u.heldout_after for u in report.units] == [u.heldout_after for u in ref_report.units]
    assert report.guard.windows == ref_report.guard.windows


def test_checkpoint_writes_each_block_once_and_counts_its_bytes(tmp_path):
    cfg = _cfg("br-gp", "wanda")
    model = make_tiny_model("llama", layers=4)
    block_bytes = sum(t.numel() * t.element_size() for t in model.model.layers[0].state_dict().values())
    _, report = prunekit.prune(model, None, cfg, calib_ids=CALIB, progress=False, checkpoint=Checkpointer(tmp_path, "x"))
    # four final blocks and their masks-only copies for the guard, no streams: 8 blocks at 50%
    # sparsity, packed (checkpoint.pack): a little over half of 8 blocks' dense bytes
    files = sum(p.stat().st_size for p in (tmp_path / "blocks").iterdir())
    assert 4 * block_bytes < files < 8 * 0.7 * block_bytes  # (headers and norms weigh more in a tiny model)
    assert files < report.checkpoint_bytes < files + 40_000  # + state.json after each window
    assert sorted(p.name for p in (tmp_path / "blocks").iterdir()) == sorted(
        [f"{j}.safetensors" for j in range(4)] + [f"{j}.lr.safetensors" for j in range(4)])


def test_streams_are_saved_when_their_replay_would_take_longer_than_checkpoint_every(tmp_path):
    """The bound is on replay (pushing the streams through the blocks finished since the last save),
    not on wall time: after window 0 nothing would need replaying, so no streams are written even
    though time has passed; from window 1 on, one block's pushes exceed a tiny interval."""
    cfg = _cfg("br-gp", "wanda")
    cfg.checkpoint_every = 1e-9  # minutes
    ckpt = Checkpointer(tmp_path, "x")
    saved = []
    prunekit.prune(make_tiny_model("llama", layers=3), None, cfg, calib_ids=CALIB, progress=False, checkpoint=ckpt,
                   on_window=lambda k: saved.append(Checkpointer(tmp_path, "x").load()["streams"]))
    assert saved[0] is None
    assert saved[1] is not None and saved[1]["pos"] == 1 and saved[2]["pos"] == 2


def test_a_resumed_run_whose_guard_reverts_the_whole_run_ends_the_same(tmp_path, monkeypatch):
    """The end-to-end revert needs every block's masks-only weights, also those saved before the stop."""
    import prunekit.pipeline as pipeline

    def worse_end_to_end(model, blocks, lr_states, e2e, g, mode):  # as if reconstruction were worse end to end
        assert sorted(lr_states) == list(range(len(blocks)))
        for j, state in lr_states.items():
            pipeline.restore(blocks[j], state)
        g.conclude(None, None, True, "forced by the test")

    monkeypatch.setattr(pipeline, "_end_to_end", worse_end_to_end)
    reference, _ = prunekit.prune(make_tiny_model("llama", layers=3), None, _cfg("br-gp", "wanda"), calib_ids=CALIB, progress=False)

    def kill(k: int) -> None:
        if k == 1:
            raise Killed

    with pytest.raises(Killed):
        prunekit.prune(make_tiny_model("llama", layers=3), None, _cfg("br-gp", "wanda"), calib_ids=CALIB,
                       progress=False, checkpoint=Checkpointer(tmp_path, fingerprint="x"), on_window=kill)
    resumed, _ = prunekit.prune(make_tiny_model("llama", layers=3), None, _cfg("br-gp", "wanda"), progress=False,
                                checkpoint=Checkpointer(tmp_path, fingerprint="x"))
    a, b = _state(reference), _state(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)
    monkeypatch.undo()
    kept, _ = prunekit.prune(make_tiny_model("llama", layers=3), None, _cfg("br-gp", "wanda"), calib_ids=CALIB, progress=False)
    assert not all(torch.equal(a[k], v) for k, v in _state(kept).items())  # the revert did change the model


def test_checkpoint_with_other_settings_is_refused(tmp_path):
    Checkpointer(tmp_path, "a").save(0, 0, {}, {}, {}, {"per_layer": {}, "notes": [], "units": [], "recon_s": 0.0})
    with pytest.raises(prunekit.PrunekitError, match="other settings"):
        Checkpointer(tmp_path, "b").load()


def test_same_seed_same_settings_same_model():
    runs = [
        _state(prunekit.prune(make_tiny_model("qwen3"), None, _cfg("attn-mlp-gp", "sparsegpt"), calib_ids=CALIB, progress=False)[0])
        for _ in range(2)
    ]
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])


def test_packed_tensors_come_back_bit_for_bit_and_smaller(tmp_path):
    """Zeros left out of pruned weights and masks stored as bits: -0.0, NaN, a weight with no zeros,
    bf16, odd sizes and small tensors all come back exactly (compared as bytes, not as values)."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(37, 29, generator=g)
    w[torch.rand(37, 29, generator=g) < 0.5] = 0.0
    w[0, 0], w[0, 1], w[0, 2] = -0.0, float("nan"), float("inf")
    tensors = {
        "pruned": w, "bf16": w.to(torch.bfloat16), "dense": torch.randn(300, generator=g),
        "mask": torch.rand(13, 11, generator=g) < 0.3, "small": torch.zeros(5), "ids": torch.arange(100),
    }
    stored, meta = pack(tensors)
    assert set(stored) == {"pruned::bits", "pruned::values", "pruned::negzero", "bf16::bits", "bf16::values", "bf16::negzero",
                           "dense", "mask::bits", "small", "ids"}
    _save_tensors(stored, tmp_path / "t.safetensors", meta)
    back, _ = _load_tensors(tmp_path / "t.safetensors")
    assert set(back) == set(tensors)
    for k, t in tensors.items():
        assert back[k].dtype == t.dtype and back[k].shape == t.shape
        assert back[k].contiguous().view(torch.uint8).equal(t.contiguous().view(torch.uint8)), k
    size = sum(v.numel() * v.element_size() for k, v in stored.items() if k.startswith("pruned::"))
    assert size < 0.6 * w.numel() * w.element_size()  # half the values, two bitmaps of 1/32 each
    assert unpack(tensors, {}) is tensors
