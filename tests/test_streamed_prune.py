"""Pruning with weights streamed from safetensors shards equals pruning in memory, bit for bit."""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny_model, random_ids
from test_resume import _cfg as resume_cfg
from transformers import AutoModelForCausalLM

import prunekit
from prunekit.blockstore import StreamedBlocks
from prunekit.config import PruneConfig
from prunekit.errors import PrunekitError
from prunekit.shards import ShardWriter, StreamedModel

CALIB = random_ids(6, 16, seed=5)


def _cfg(recon: str, method: str, **recon_extra) -> PruneConfig:
    """The resume tests' settings (2 epochs at lr 1e-2 when reconstructing), with ``recon_extra`` on top."""
    cfg = resume_cfg(recon, method)
    for k, v in recon_extra.items():
        setattr(cfg.recon, k, v)
    return cfg


def _streamed(src, out, cfg, lr_dir=None):
    sm = StreamedModel(src, attn_implementation="eager")
    writer = ShardWriter(out, max_shard_size="20KB")
    store = StreamedBlocks(sm, writer, lr_dir=lr_dir)
    _, report = prunekit.prune(sm.model, None, cfg, calib_ids=CALIB, progress=False, store=store)
    sm.model.config.use_cache = True
    writer.finish(config=sm.model.config, copy_from=src, expected=sm.saved_names())  # as run.py does
    assert sm.resident_bytes() == 0  # every part was released
    return report


@pytest.mark.parametrize(("family", "recon", "method"), [
    ("llama", "lr", "sparsegpt"), ("llama", "br-gp", "wanda"), ("opt", "lr", "wanda"), ("opt", "br-gp", "sparsegpt"),
    ("gpt2", "lr", "wanda"), ("gpt2", "br-gp", "wanda"), ("llama", "br-gp-cr", "sparsegpt"),
])
def test_streamed_run_equals_the_in_memory_run(tmp_path, family, recon, method):
    model = make_tiny_model(family, layers=3)
    src = tmp_path / "src"
    model.save_pretrained(src, max_shard_size="20KB")  # several shards
    cfg = _cfg(recon, method)
    _, ref_report = prunekit.prune(model, None, cfg, calib_ids=CALIB, progress=False)
    report = _streamed(src, tmp_path / "out", cfg, lr_dir=tmp_path / "lr")
    out = AutoModelForCausalLM.from_pretrained(tmp_path / "out", attn_implementation="eager").eval()
    ref, got = model.state_dict(), out.state_dict()
    assert ref.keys() == got.keys()
    changed = [k for k in ref if not torch.equal(ref[k], got[k])]
    assert not changed, changed[:3]
    assert report.per_layer == ref_report.per_layer
    assert [u.heldout_after for u in report.units] == [u.heldout_after for u in ref_report.units]
    with torch.no_grad():
        ids = random_ids(2, 16, seed=9)
        assert torch.equal(model(ids).logits, out(ids).logits)
    if recon != "lr":  # the end-to-end check walks what was written, block by block: the same figures
        assert report.guard.windows == ref_report.guard.windows
        got, ref = report.guard.end_to_end, ref_report.guard.end_to_end
        assert got["compared"] and got["reverted"] == ref["reverted"] and got["worse"] == ref["worse"]
        for key in ("reconstructed", "masks_only"):
            assert got[key]["kl"] == pytest.approx(ref[key]["kl"], rel=1e-4)


@pytest.mark.parametrize("lr_dir", [True, False])
def test_streamed_guard_reverts_the_whole_run_like_the_in_memory_one(tmp_path, monkeypatch, lr_dir):
    """A forced end-to-end revert writes the masks-only weights to the output; without a place for
    them the check is not made and the report says so."""
    import prunekit.pipeline as pipeline

    def forced(model, blocks, lr_states, e2e, g, mode):
        for j, state in lr_states.items():
            pipeline.restore(blocks[j], state)
        g.conclude(None, None, True, "forced by the test")

    def forced_streamed(store, e2e, g, mode, device, ranks=None):
        store.revert = True
        g.conclude(None, None, True, "forced by the test")

    monkeypatch.setattr(pipeline, "_end_to_end", forced)
    monkeypatch.setattr(pipeline, "_end_to_end_streamed", forced_streamed)
    model = make_tiny_model("llama", layers=3)
    src = tmp_path / "src"
    model.save_pretrained(src, max_shard_size="20KB")
    cfg = _cfg("br-gp", "wanda", lr=1e-3)  # every block improves: the revert changes the model
    prunekit.prune(model, None, cfg, calib_ids=CALIB, progress=False)
    report = _streamed(src, tmp_path / "out", cfg, lr_dir=tmp_path / "lr" if lr_dir else None)
    got = AutoModelForCausalLM.from_pretrained(tmp_path / "out").state_dict()
    same = all(torch.equal(v, got[k]) for k, v in model.state_dict().items())
    assert same == lr_dir
    if not lr_dir:
        assert report.guard.end_to_end["compared"] is False and any("streamed" in n for n in report.notes)


class Killed(Exception):
    pass


@pytest.mark.parametrize(("recon", "every"), [("br-gp", 10.0), ("br-gp-cr", 10.0), ("br-gp-cr", 0.0), ("lr", 0.0)])
def test_streamed_run_killed_and_resumed_equals_the_in_memory_run(tmp_path, recon, every):
    """Finished blocks are in the output shards (committed at each checkpoint); the resumed run reads
    them back to replay the streams and ends with the same model as an uninterrupted in-memory run."""
    from prunekit.checkpoint import Checkpointer

    model = make_tiny_model("llama", layers=4)
    src = tmp_path / "src"
    model.save_pretrained(src, max_shard_size="20KB")
    cfg = _cfg(recon, "sparsegpt")
    cfg.checkpoint_every = every
    prunekit.prune(model, None, cfg, calib_ids=CALIB, progress=False)
    out = tmp_path / "out"
    out.mkdir()

    def kill(k: int) -> None:
        if k == 2:
            raise Killed

    sm = StreamedModel(src, attn_implementation="eager")
    with pytest.raises(Killed):
        prunekit.prune(sm.model, None, cfg, calib_ids=CALIB, progress=False, checkpoint=Checkpointer(out / "ckpt", "x"),
                       on_window=kill, store=StreamedBlocks(sm, ShardWriter(out, "20KB", in_place=True)))
    assert not list((out / "ckpt" / "blocks").glob("?.safetensors"))  # final blocks are in the output only
    sm = StreamedModel(src, attn_implementation="eager")
    writer = ShardWriter(out, "20KB", in_place=True, resume=True)
    assert writer.names  # blocks finished before the stop
    finished = []
    _, report = prunekit.prune(sm.model, None, cfg, progress=False, checkpoint=Checkpointer(out / "ckpt", "x"),
                               on_window=finished.append, store=StreamedBlocks(sm, writer))
    assert finished[0] == 3
    sm.model.config.use_cache = True
    writer.finish(config=sm.model.config, copy_from=src, expected=sm.saved_names())
    got = AutoModelForCausalLM.from_pretrained(out).state_dict()
    assert all(torch.equal(v, got[k]) for k, v in model.state_dict().items())


def test_streamed_kd_and_owl_equal_in_memory(tmp_path):
    model = make_tiny_model("qwen3", layers=3)
    src = tmp_path / "src"
    model.save_pretrained(src, max_shard_size="20KB")
    cfg = _cfg("br-gp", "wanda", loss="kd")
    cfg.sparsity.owl = True
    cfg.sparsity.sparsity = "0.6"
    prunekit.prune(model, None, cfg, calib_ids=CALIB, progress=False)
    _streamed(src, tmp_path / "out", cfg)
    got = AutoModelForCausalLM.from_pretrained(tmp_path / "out").state_dict()
    assert all(torch.equal(v, got[k]) for k, v in model.state_dict().items())


def test_streamed_run_refuses_self_generated_calibration(tmp_path):
    model = make_tiny_model("llama", layers=2)
    model.save_pretrained(tmp_path / "src")
    sm = StreamedModel(tmp_path / "src")
    cfg = _cfg("lr", "wanda")
    cfg.calib.calib = "self"
    with pytest.raises(PrunekitError, match="self-generated calibration needs the whole model"):
        prunekit.prune(sm.model, None, cfg, progress=False, store=StreamedBlocks(sm, ShardWriter(tmp_path / "out")))


# ----------------------------------------------------------------------------- the command line


def _cli(model_dir, corpus, out, *extra):
    from prunekit.cli import main

    return main([
        "prune", "--model", str(model_dir), "--calib", str(corpus), "--nsamples", "4", "--seqlen", "16",
        "--eval", str(corpus), "--eval-seqlen", "32", "--eval-windows", "3", "--device", "cpu", "--batch-size", "2",
        "--method", "sparsegpt", "--recon", "br-gp", "--epochs", "1", "--out", str(out), *extra,
    ])


def test_cli_streamed_run_saves_and_evaluates_as_the_in_memory_run(model_dir, word_text, tmp_path):
    import json

    from safetensors.torch import load_file

    assert _cli(model_dir, word_text, tmp_path / "mem", "--weights", "memory") == 0
    assert _cli(model_dir, word_text, tmp_path / "stream", "--weights", "stream", "--max-shard-size", "30KB") == 0
    mem = load_file(tmp_path / "mem" / "model.safetensors")
    assert (tmp_path / "stream" / "model.safetensors.index.json").is_file()  # sharded
    streamed = AutoModelForCausalLM.from_pretrained(tmp_path / "stream").state_dict()
    assert all(torch.equal(v, streamed[k]) for k, v in mem.items())
    m_mem = json.loads((tmp_path / "mem" / "metrics.json").read_text())
    m_str = json.loads((tmp_path / "stream" / "metrics.json").read_text())
    (name,) = m_mem["perplexity"]
    assert m_str["perplexity"][name] == pytest.approx(m_mem["perplexity"][name], rel=1e-5)
    assert m_str["reconstruction"]["guard"]["end_to_end"]["compared"]
    assert not (tmp_path / "stream" / "checkpoint").exists()
    assert m_str["checkpoint_bytes"] < m_mem["checkpoint_bytes"]  # finished blocks are checkpointed by the output itself
    assert (tmp_path / "stream" / "tokenizer.json").is_file()


def test_cli_streamed_run_interrupted_then_resumed(model_dir, word_text, tmp_path, monkeypatch):
    from test_faults import _interrupt_after

    from prunekit.cli import main

    assert _cli(model_dir, word_text, tmp_path / "whole", "--weights", "stream", "--max-shard-size", "30KB") == 0
    undo = _interrupt_after(1, monkeypatch)
    assert _cli(model_dir, word_text, tmp_path / "run", "--weights", "stream", "--max-shard-size", "30KB") == 130
    undo()
    assert main(["prune", "--resume", str(tmp_path / "run")]) == 0
    a = AutoModelForCausalLM.from_pretrained(tmp_path / "whole").state_dict()
    b = AutoModelForCausalLM.from_pretrained(tmp_path / "run").state_dict()
    assert all(torch.equal(v, b[k]) for k, v in a.items())


def test_cli_streaming_refusals_are_one_line(model_dir, word_text, tmp_path, capsys):
    from test_hardening import one_error_line

    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    assert _cli(gguf, word_text, tmp_path / "a", "--weights", "stream") == 2
    one_error_line(capsys, "--weights stream reads a local directory of safetensors")
    assert _cli(model_dir, word_text, tmp_path / "b", "--weights", "stream", "--calib", "self") == 2
    one_error_line(capsys, "self-generated calibration needs the whole model")
    assert not (tmp_path / "b").exists() and not list(tmp_path.glob(".b*"))
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in model_dir.iterdir():
        (broken / f.name).write_bytes(f.read_bytes())
    data = (broken / "model.safetensors").read_bytes()
    (broken / "model.safetensors").write_bytes(data[: len(data) // 2])
    assert _cli(broken, word_text, tmp_path / "c", "--weights", "stream") == 2
    assert "model.safetensors" in one_error_line(capsys)
    assert _cli(model_dir, word_text, tmp_path / "d", "--weights", "sometimes") == 2
    one_error_line(capsys, "unknown weights")


def test_streamed_training_holds_no_dense_copy_nor_snapshot_in_ram(tmp_path, monkeypatch):
    """Issue 12's host-memory budget: while a streamed unit trains, the window's dense copy has left
    RAM (meta parameters, re-read from the shards afterwards), the guard's masks-only snapshot is a
    file, and the hold masks are the run's bool masks; the result stays the in-memory run's."""
    import prunekit.pipeline as P
    from prunekit.blockstore import SpilledStates
    from prunekit.reconstruct import _steps_in_backward

    seen = {"fits": 0}
    evicted: list[torch.nn.Module] = []
    spills: list[SpilledStates] = []
    orig_evict, orig_held, orig_fit = StreamedBlocks.evict_dense, StreamedBlocks.held, P.fit

    def evict(self, j, dense):
        orig_evict(self, j, dense)
        evicted.append(dense)

    def held(self):
        spills.append(orig_held(self))
        return spills[-1]

    def fit(unit, masks, data, *a, **k):
        assert data.lean and _steps_in_backward(data)
        assert evicted and all(p.is_meta for p in evicted[-1].parameters())
        assert len(spills[-1]) == 1 and list(spills[-1].dir.iterdir())  # on disk while training
        seen["fits"] += 1
        return orig_fit(unit, masks, data, *a, **k)

    monkeypatch.setattr(StreamedBlocks, "evict_dense", evict)
    monkeypatch.setattr(StreamedBlocks, "held", held)
    monkeypatch.setattr(P, "fit", fit)
    model = make_tiny_model("llama", layers=3)
    src = tmp_path / "src"
    model.save_pretrained(src, max_shard_size="20KB")
    cfg = _cfg("br-gp", "wanda")
    _streamed(src, tmp_path / "out", cfg, lr_dir=tmp_path / "lr")
    assert seen["fits"] == 3
    assert not any(p.is_meta for d in evicted for p in d.parameters())  # reloaded after each fit
    assert not any(s.dir.exists() for s in spills)  # the spill files are removed after each window
    monkeypatch.setattr(P, "fit", orig_fit)
    prunekit.prune(model, None, cfg, calib_ids=CALIB, progress=False)
    out = AutoModelForCausalLM.from_pretrained(tmp_path / "out", attn_implementation="eager")
    ref, got = model.state_dict(), out.state_dict()
    assert all(torch.equal(ref[k], got[k]) for k in ref)


def test_spilled_states_round_trip_to_the_bit_and_clean_up(tmp_path):
    from prunekit.blockstore import SpilledStates

    s = SpilledStates(tmp_path / "ck")
    state = {"w": torch.tensor([[-0.0, 1.5], [float("nan"), 2.0]]), "b": torch.arange(3, dtype=torch.bfloat16)}
    s[4] = state
    back = s[4]
    assert back.keys() == state.keys()
    assert all(back[k].dtype == state[k].dtype and back[k].view(torch.uint8).equal(state[k].view(torch.uint8)) for k in state)
    assert list(s) == [4] and len(s) == 1 and 3 not in s
    del s[4]
    assert not list(s.dir.iterdir())
    s[1] = state
    s.clear()
    assert not s.dir.exists() and len(s) == 0
