"""Weights streamed from disk (prunekit.shards): reading blocks from shards, releasing them, writing shards."""

from __future__ import annotations

import gc
import json
import weakref
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import _config, make_tiny_model, random_ids, save_tiny_model_dir
from prunekit.capture import capture, run_block
from prunekit.errors import PrunekitError
from prunekit.families import Readout, weight_matrix
from prunekit.shards import (
    INDEX,
    SINGLE,
    ShardWriter,
    StreamedModel,
    open_sharded,
    parse_size,
    stream_weights,
    weight_bytes,
)

LAYERS = 3
SMALL = "20KB"  # a tiny block is about 36 KB: several shards, blocks split across them
FAMS = ("llama", "llama-tied", "opt", "gpt2")


def _model(family: str):
    if family == "llama-tied":  # SmolLM2 ties its LM head to the embeddings; the tiny Llama config does not
        config, cls = _config("llama", LAYERS)
        config.tie_word_embeddings = True
        config._attn_implementation = "eager"
        torch.manual_seed(3)
        model = cls(config)
        g = torch.Generator().manual_seed(4)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=g))
        return model.eval()
    return make_tiny_model(family, layers=LAYERS)


_CACHE: dict[tuple[str, bool], Path] = {}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """``saved(family, sharded)``: a directory written by save_pretrained (read only; shared by the tests)."""

    def get(family: str, sharded: bool = True) -> Path:
        key = (family, sharded)
        if key not in _CACHE:
            d = tmp_path_factory.mktemp("st") / f"{family}-{'sharded' if sharded else 'single'}"
            if family == "llama-tied":
                _model(family).save_pretrained(d, max_shard_size=SMALL if sharded else "50GB")
            else:
                save_tiny_model_dir(d, family, layers=LAYERS)  # with a tokenizer
                if sharded:
                    (d / SINGLE).unlink()
                    make_tiny_model(family, layers=LAYERS).save_pretrained(d, max_shard_size=SMALL)
            _CACHE[key] = d
        return _CACHE[key]

    return get


def _loaded(d: Path, dtype=torch.float32):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(d, dtype=dtype)
    model.config.use_cache = False
    return model.eval()


def _copy(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


# ----------------------------------------------------------------------------- opening and sizes


def test_open_sharded_indexes_every_shard_and_sizes_from_headers(saved):
    d = saved("llama", sharded=True)
    ckpt = open_sharded(d)
    index = json.loads((d / INDEX).read_text())
    assert len(ckpt.files) == len(set(index["weight_map"].values())) >= 3
    assert set(ckpt.tensors) == set(index["weight_map"])
    assert weight_bytes(d) == index["metadata"]["total_size"] == sum(
        t.numel() * t.element_size() for t in _loaded(d).state_dict().values()
    )
    assert weight_bytes(d, torch.bfloat16) * 2 == weight_bytes(d)
    single = saved("llama", sharded=False)
    assert open_sharded(single).files == [single / SINGLE] and weight_bytes(single) == weight_bytes(d)


def test_stream_weights_compares_with_available_ram(saved, monkeypatch):
    d = saved("llama", sharded=False)
    size = weight_bytes(d)
    monkeypatch.setattr("prunekit.shards.available_ram", lambda: 4 * size)
    assert not stream_weights(d)
    monkeypatch.setattr("prunekit.shards.available_ram", lambda: size)
    assert stream_weights(d)


def test_parse_size():
    assert parse_size("5GB") == 5 * 10**9
    assert parse_size("5GiB") == 5 * 2**30
    assert parse_size("20kb") == 20_000
    assert parse_size(123) == 123 and parse_size("123") == 123
    with pytest.raises(PrunekitError, match="not a size"):
        parse_size("five")


# ----------------------------------------------------------------------------- skeleton and materialising


@pytest.mark.parametrize("family", FAMS)
def test_skeleton_has_meta_parameters_and_the_loaded_models_buffers(saved, family):
    d = saved(family)
    sm = StreamedModel(d)
    ref = _loaded(d)
    assert all(p.device.type == "meta" for p in sm.model.parameters()) and sm.resident_bytes() == 0
    ours, theirs = dict(sm.model.named_buffers()), dict(ref.named_buffers())
    assert ours.keys() == theirs.keys()
    for name in ours:  # rotary inv_freq is not in the checkpoint: it must be computed, not left empty
        assert ours[name].device.type == "cpu" and torch.equal(ours[name], theirs[name]), name
    if family.startswith("llama"):
        assert ours  # the comparison above is not vacuous


@pytest.mark.parametrize("sharded", [True, False])
@pytest.mark.parametrize("family", FAMS)
def test_materialised_blocks_equal_the_loaded_blocks(saved, family, sharded):
    d = saved(family, sharded)
    sm = StreamedModel(d)
    ref = _loaded(d)
    ref_blocks = sm.layout.family.blocks
    for i in range(sm.num_blocks):
        expected = ref.get_submodule(f"{ref_blocks}.{i}").state_dict()
        block = sm.materialize(i)
        assert block is sm.layout.blocks[i]
        got = block.state_dict()
        assert got.keys() == expected.keys()
        assert all(torch.equal(got[k], expected[k]) for k in got)
        # only block i is real
        others = [p for j, b in enumerate(sm.layout.blocks) if j != i for p in b.parameters()]
        assert all(p.device.type == "meta" for p in others)
        sm.release(i)
        dense = sm.read(i)  # the original weights again, without materialising
        assert dense.keys() == {k for k, _ in ref.get_submodule(f"{ref_blocks}.{i}").named_parameters()}
        assert all(torch.equal(dense[k], expected[k]) for k in dense)
        copy_ = sm.dense_block(i)
        assert all(torch.equal(v, expected[k]) for k, v in copy_.state_dict().items())
        assert all(p.device.type == "meta" for p in sm.layout.blocks[i].parameters())


@pytest.mark.parametrize("sharded", [True, False])
@pytest.mark.parametrize("family", FAMS)
def test_block_by_block_forward_gives_the_loaded_models_logits(saved, family, sharded):
    d = saved(family, sharded)
    ref = _loaded(d)
    ids = random_ids(3, 12, seed=5)
    with torch.no_grad():
        expected = ref(ids).logits
    sm = StreamedModel(d)
    sm.materialize("input")
    sm.materialize("head")
    outside = sm.resident_bytes()
    captured = capture(sm.model, sm.layout.blocks, ids, batch_size=3, progress=False)
    hidden = captured.hidden
    peak = 0
    with torch.no_grad():
        for i in range(sm.num_blocks):
            block = sm.materialize(i)
            peak = max(peak, sm.resident_bytes())
            hidden = run_block(block, hidden, captured.kwargs_for(i, 3))
            sm.release(i)
        logits = Readout(sm.model)(hidden)
    block_bytes = sum(p.numel() * p.element_size() for p in ref.get_submodule(f"{sm.layout.family.blocks}.0").parameters())
    assert peak == outside + block_bytes  # one block at a time, next to the embeddings and head
    torch.testing.assert_close(logits, expected, rtol=0, atol=1e-5)


def test_bfloat16_skeleton_matches_from_pretrained_in_bfloat16(saved):
    d = saved("llama", sharded=True)
    ref = _loaded(d, torch.bfloat16)
    sm = StreamedModel(d, dtype=torch.bfloat16)
    sm.materialize("all")
    assert all(p.dtype == torch.bfloat16 for p in sm.model.parameters())
    ids = random_ids(2, 10, seed=1)
    with torch.no_grad():
        assert torch.equal(sm.model(ids).logits, ref(ids).logits)


@pytest.mark.parametrize("family", ["llama-tied", "gpt2", "opt"])
def test_tied_head_and_embeddings_are_one_tensor_read_once(saved, family):
    sm = StreamedModel(saved(family))
    emb, head = sm.model.get_input_embeddings(), sm.model.get_output_embeddings()
    sm.materialize("head")
    assert head.weight is emb.weight and head.weight.device.type == "cpu"
    sm.materialize("input")
    assert head.weight is emb.weight
    sm.release("head")  # the input part still uses the table
    assert emb.weight.device.type == "cpu" and head.weight is emb.weight
    sm.release("input")
    assert emb.weight.device.type == "meta" and head.weight is emb.weight
    assert sm.resident_bytes() == 0


def test_untied_head_is_its_own_tensor(saved):
    sm = StreamedModel(saved("llama"))
    sm.materialize("head")
    assert sm.model.get_output_embeddings().weight.device.type == "cpu"
    assert sm.model.get_input_embeddings().weight.device.type == "meta"  # input not needed for the head
    assert sm.model.model.norm.weight.device.type == "cpu"


def test_released_block_frees_its_memory(saved):
    sm = StreamedModel(saved("llama"))
    block = sm.materialize(1)
    refs = [weakref.ref(p) for p in block.parameters()]
    assert sm.resident_bytes() > 0
    sm.release(1)
    gc.collect()
    assert all(r() is None for r in refs)  # nothing here keeps the read tensors alive
    assert all(p.device.type == "meta" for p in block.parameters()) and sm.resident_bytes() == 0


def test_base_model_checkpoint_keys_are_matched_like_from_pretrained(saved, tmp_path):
    """GPT-2 checkpoints on the hub were saved from GPT2Model: ``h.0...`` instead of ``transformer.h.0...``."""
    d = _copy(saved("gpt2", sharded=False), tmp_path / "gpt2")
    tensors = load_file(d / SINGLE)
    save_file({k.removeprefix("transformer."): v for k, v in tensors.items()}, d / SINGLE, metadata={"format": "pt"})
    ref = _loaded(d)
    sm = StreamedModel(d)
    sm.materialize("all")
    ids = random_ids(2, 8)
    with torch.no_grad():
        assert torch.equal(sm.model(ids).logits, ref(ids).logits)


# ----------------------------------------------------------------------------- writing


def _modify(model_or_block_params: dict[str, torch.Tensor], step: int) -> None:
    """Change weights in a way a wrong writer could not reproduce: zero half, scale the rest."""
    with torch.no_grad():
        for n, (name, t) in enumerate(sorted(model_or_block_params.items())):
            if t.dim() == 2:
                t.view(-1)[::2] = 0
            t.mul_(1.0 + 0.01 * (step + n))


def _write_all(sm: StreamedModel, writer: ShardWriter, modify: bool = True, blocks=None) -> None:
    for i in blocks if blocks is not None else range(sm.num_blocks):
        block = sm.materialize(i)
        if modify:
            _modify(dict(block.named_parameters()), i)
        writer.add(sm.save_state(i))
        sm.release(i)


def _write_rest(sm: StreamedModel, writer: ShardWriter, modify: bool = True) -> None:
    sm.materialize("input")
    if modify:
        _modify({"emb": sm.model.get_input_embeddings().weight}, 100)
    writer.add(sm.save_state("input"))
    sm.materialize("head")
    writer.add(sm.save_state("head"))
    sm.release("input")
    sm.release("head")


def _expected_model(d: Path):
    """The in-memory path: the loaded model with the same changes."""
    ref = _loaded(d)
    sm_layout = StreamedModel(d).layout.family.blocks
    for i in range(LAYERS):
        _modify(dict(ref.get_submodule(f"{sm_layout}.{i}").named_parameters()), i)
    _modify({"emb": ref.get_input_embeddings().weight}, 100)
    return ref


@pytest.mark.parametrize("family", FAMS)
def test_writer_round_trip_loads_with_plain_transformers(saved, family, tmp_path):
    from transformers import AutoTokenizer

    src = saved(family)
    sm = StreamedModel(src)
    writer = ShardWriter(tmp_path / "out", max_shard_size=SMALL)
    _write_all(sm, writer)
    _write_rest(sm, writer)
    config = sm.model.config
    out = writer.finish(config=config, copy_from=src, expected=sm.saved_names())
    assert out == tmp_path / "out" and not (tmp_path / ".out.partial").exists()
    files = sorted(p.name for p in out.iterdir())
    shards = [f for f in files if f.startswith("model-")]
    assert len(shards) >= 3 and all(f.endswith(f"-of-{len(shards):05d}.safetensors") for f in shards)
    assert INDEX in files and SINGLE not in files and not any(f.startswith(".") for f in files)

    expected = _expected_model(src)
    # exactly the names save_pretrained writes (tied head omitted, no renaming)
    expected.save_pretrained(tmp_path / "hf", max_shard_size=SMALL)
    ours = json.loads((out / INDEX).read_text())
    theirs = json.loads((tmp_path / "hf" / INDEX).read_text())
    assert ours["weight_map"].keys() == theirs["weight_map"].keys()
    assert ours["metadata"]["total_size"] == theirs["metadata"]["total_size"]
    assert ours["metadata"]["total_parameters"] == theirs["metadata"]["total_parameters"]

    reloaded = _loaded(out)
    got, want = reloaded.state_dict(), expected.state_dict()
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in got)
    ids = random_ids(2, 12, seed=2)
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, expected(ids).logits)
    if family != "llama-tied":  # saved with a tokenizer: copied along
        assert AutoTokenizer.from_pretrained(out)("w3 w4")["input_ids"][-1] == 4


def test_writer_single_shard_is_model_safetensors_and_tokenizer_object(saved, tmp_path):
    from transformers import AutoTokenizer

    src = saved("llama", sharded=False)
    sm = StreamedModel(src)
    writer = ShardWriter(tmp_path / "out")  # default 5GB: one file
    _write_all(sm, writer, modify=False)
    _write_rest(sm, writer, modify=False)
    out = writer.finish(config=sm.model.config, tokenizer=AutoTokenizer.from_pretrained(src), expected=sm.saved_names())
    assert (out / SINGLE).is_file() and not (out / INDEX).exists() and (out / "tokenizer.json").is_file()
    assert load_file(out / SINGLE).keys() == load_file(src / SINGLE).keys()
    ref, reloaded = _loaded(src), _loaded(out)
    assert all(torch.equal(a, b) for a, b in zip(ref.state_dict().values(), reloaded.state_dict().values()))


def test_writer_in_place_resumes_from_its_last_commit(saved, tmp_path):
    """A run killed after a commit continues from it: tensors added later are dropped, then written again."""
    src = saved("opt")
    run = tmp_path / ".run.partial"
    run.mkdir()
    (run / "metrics.json").write_text("{}")  # a run directory holds other files too
    sm = StreamedModel(src)
    # a tiny header area: shards also close when their header is full
    writer = ShardWriter(run, max_shard_size=SMALL, in_place=True, header_reserve=256)
    _write_all(sm, writer, blocks=[0, 1])
    writer.commit()
    committed = set(writer.names)
    _write_all(sm, writer, blocks=[2])  # lost: the run dies before the next commit
    writer._file.flush()
    del writer

    writer = ShardWriter(run, max_shard_size=SMALL, in_place=True, resume=True, header_reserve=256)
    assert writer.names == committed
    _write_all(sm, writer, blocks=[2])
    _write_rest(sm, writer)
    out = writer.finish(config=sm.model.config, copy_from=src, expected=sm.saved_names())
    assert out == run and (run / "metrics.json").is_file()
    assert not any(p.name.startswith(".shard") or p.name == ShardWriter.MANIFEST for p in run.iterdir())
    assert len(json.loads((run / INDEX).read_text())["weight_map"]) == len(sm.saved_names())
    expected, reloaded = _expected_model(src), _loaded(run)
    got, want = reloaded.state_dict(), expected.state_dict()
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_writer_leaves_nothing_half_written(saved, tmp_path):
    src = saved("llama")
    sm = StreamedModel(src)
    writer = ShardWriter(tmp_path / "out", max_shard_size=SMALL)
    _write_all(sm, writer, blocks=[0, 1])
    assert not (tmp_path / "out").exists()  # only the hidden staging directory exists so far
    with pytest.raises(ValueError, match="missing"):
        writer.finish(config=sm.model.config, expected=sm.saved_names())
    assert not (tmp_path / "out").exists()
    writer.abort()
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "taken").mkdir()
    with pytest.raises(PrunekitError, match="taken already exists"):
        ShardWriter(tmp_path / "taken")


def test_save_state_covers_every_written_name_once(saved):
    sm = StreamedModel(saved("gpt2"))
    sm.materialize("all")
    parts = [sm.save_state(i) for i in range(sm.num_blocks)] + [sm.save_state("input"), sm.save_state("head")]
    names = [n for p in parts for n in p]
    assert len(names) == len(set(names)) and set(names) == sm.saved_names()
    assert "lm_head.weight" not in sm.saved_names() and "transformer.wte.weight" in sm.saved_names()


# ----------------------------------------------------------------------------- bad input


def test_directory_with_pickle_weights_only(tmp_path):
    d = save_tiny_model_dir(tmp_path / "bin", "llama", safe=False)
    with pytest.raises(PrunekitError, match=r"pytorch_model\.bin.*save_pretrained\(.*safe_serialization=True\)"):
        open_sharded(d)


def test_missing_config(saved, tmp_path):
    d = _copy(saved("llama", False), tmp_path / "m")
    (d / "config.json").unlink()
    with pytest.raises(PrunekitError, match="config.json"):
        open_sharded(d)


def test_missing_shard(saved, tmp_path):
    d = _copy(saved("llama"), tmp_path / "m")
    shard = sorted(d.glob("model-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(PrunekitError, match=f"{shard.name} is missing") as e:
        StreamedModel(d)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("cut", [10, "header"])
def test_truncated_shard(saved, tmp_path, cut):
    d = _copy(saved("llama"), tmp_path / "m")
    shard = sorted(d.glob("model-*.safetensors"))[-1]
    data = shard.read_bytes()
    shard.write_bytes(data[:-cut] if isinstance(cut, int) else data[:40])
    with pytest.raises(PrunekitError, match=rf"{shard.name} is truncated"):
        open_sharded(d)


def test_truncated_single_file(saved, tmp_path):
    d = _copy(saved("gpt2", False), tmp_path / "m")
    f = d / SINGLE
    f.write_bytes(f.read_bytes()[:-1])
    with pytest.raises(PrunekitError, match=rf"{SINGLE} is truncated"):
        weight_bytes(d)


def test_index_naming_a_missing_file(saved, tmp_path):
    d = _copy(saved("opt"), tmp_path / "m")
    index = json.loads((d / INDEX).read_text())
    key = next(iter(index["weight_map"]))
    index["weight_map"][key] = "model-00099-of-00099.safetensors"
    (d / INDEX).write_text(json.dumps(index))
    with pytest.raises(PrunekitError, match="model-00099-of-00099.safetensors is missing"):
        open_sharded(d)


def test_index_placing_a_tensor_in_the_wrong_shard(saved, tmp_path):
    d = _copy(saved("opt"), tmp_path / "m")
    index = json.loads((d / INDEX).read_text())
    files = sorted(set(index["weight_map"].values()))
    key = next(k for k, v in index["weight_map"].items() if v == files[0])
    index["weight_map"][key] = files[1]
    (d / INDEX).write_text(json.dumps(index))
    with pytest.raises(PrunekitError, match=rf"{files[1]} does not hold {key}"):
        open_sharded(d)


def test_tensor_the_model_needs_is_in_no_shard(saved, tmp_path):
    d = _copy(saved("llama", False), tmp_path / "m")
    tensors = load_file(d / SINGLE)
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, d / SINGLE, metadata={"format": "pt"})
    open_sharded(d)  # the files themselves are fine
    with pytest.raises(PrunekitError, match=r"model\.layers\.1\.mlp\.up_proj\.weight"):
        StreamedModel(d)


def test_weights_that_do_not_match_the_config(saved, tmp_path):
    d = _copy(saved("llama", False), tmp_path / "m")
    config = json.loads((d / "config.json").read_text())
    config["intermediate_size"] = 48
    (d / "config.json").write_text(json.dumps(config))
    with pytest.raises(PrunekitError, match="shape"):
        StreamedModel(d)


def test_writer_in_bfloat16_records_the_dtype(saved, tmp_path):
    src = saved("gpt2")
    sm = StreamedModel(src, dtype=torch.bfloat16)
    writer = ShardWriter(tmp_path / "out", max_shard_size=SMALL)
    _write_all(sm, writer, modify=False)
    _write_rest(sm, writer, modify=False)
    out = writer.finish(config=sm.model.config, copy_from=src, expected=sm.saved_names())
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(out)  # dtype from config.json
    ref = _loaded(src, torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in reloaded.parameters())
    got, want = reloaded.state_dict(), ref.state_dict()
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_every_supported_family_streams_to_the_loaded_logits(family, tmp_path):
    """Gemma's embed_scale and Gemma 2/3's per-layer-type rotary tables are buffers built by the skeleton."""
    d = tmp_path / family
    make_tiny_model(family, layers=2).save_pretrained(d, max_shard_size="10KB")
    ref = _loaded(d)
    sm = StreamedModel(d)
    sm.materialize("all")
    ids = random_ids(2, 12)
    with torch.no_grad():
        assert torch.equal(sm.model(ids).logits, ref(ids).logits)
