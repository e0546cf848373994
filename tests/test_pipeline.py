"""End-to-end pruning of tiny models of every family, plus perplexity on tiny models."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import FAMILIES, make_tiny_model, random_ids

import prunekit
from prunekit.config import PruneConfig
from prunekit.criteria import InputStats, sparsegpt_prune, wanda_scores
from prunekit.evaluate import perplexity_of_ids, window_losses
from prunekit.families import discover, is_linear, weight_matrix
from prunekit.masks import unstructured_mask

METHODS = ("magnitude", "wanda", "sparsegpt")
SPARSITIES = ("0.5", "2:4")
CALIB = random_ids(5, 16, seed=7)  # 5 windows in batches of 2: the last batch is ragged


def _config(method: str, sparsity: str, **sparsity_kw) -> PruneConfig:
    cfg = PruneConfig(batch_size=2, device="cpu")
    cfg.recon.recon = "lr"  # layer-wise pruning alone (the default reconstructs, see test_default_reconstructs)
    cfg.sparsity.method = method
    cfg.sparsity.sparsity = sparsity
    for k, v in sparsity_kw.items():
        setattr(cfg.sparsity, k, v)
    return cfg


def _cases():
    for family in FAMILIES:
        for method in METHODS:
            for sparsity in SPARSITIES:
                yield pytest.param(family, method, sparsity, id=f"{family}-{method}-{sparsity}")


def _linear_weights(model):
    """``{full name of a block linear's weight parameter: (module, [out, in] view)}``."""
    layout = discover(model)
    out = {}
    for i in range(len(layout.blocks)):
        for name, lin in layout.block_linears(i).items():
            out[f"{layout.family.blocks}.{i}.{name}"] = (lin, weight_matrix(lin))
    return layout, out


@pytest.mark.parametrize("family,method,sparsity", list(_cases()))
def test_prune_hits_target_in_every_linear(family, method, sparsity):
    model = make_tiny_model(family)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    layout, linears = _linear_weights(model)
    dense = {name: w.clone() for name, (_, w) in linears.items()}
    weight_keys = {name + ".weight" for name in linears}
    prefix = layout.family.blocks + "."
    assert len(linears) >= 8 and {n[len(prefix) :].split(".")[0] for n in linears} == {"0", "1"}

    pruned, report = prunekit.prune(model, None, _config(method, sparsity), calib_ids=CALIB, progress=False)
    assert pruned is model

    # one report entry per linear of every block, each exactly on target
    assert set(report.per_layer) == set(linears)
    assert all(v == pytest.approx(0.5, abs=1e-12) for v in report.per_layer.values())
    assert report.overall == pytest.approx(0.5)
    assert report.pruned_params == sum(w.numel() for _, w in linears.values())
    assert report.method == method and report.sparsity == sparsity
    if method == "magnitude":
        assert report.scope == "layer"
    else:
        assert (report.calib, report.nsamples, report.seqlen) == ("given", 5, 16)

    for name, (_, w) in linears.items():
        orig = dense[name]
        zero = w == 0
        rows, cols = w.shape
        assert zero.sum().item() == w.numel() // 2, name
        if sparsity == "2:4":  # groups of 4 consecutive *inputs* (GPT-2's Conv1D is stored transposed)
            assert ((~zero).view(rows, cols // 4, 4).sum(-1) == 2).all(), name
        if method == "wanda":
            assert (zero.sum(1) == cols // 2).all(), name  # per output row
        if method in ("magnitude", "wanda"):  # no weight update: the kept weights are the dense ones
            assert torch.equal(w[~zero], orig[~zero]), name
        if method == "magnitude":
            if sparsity == "0.5":  # per layer: every kept weight outweighs every pruned one
                assert orig[~zero].abs().min() >= orig[zero].abs().max(), name
            else:
                g = orig.abs().view(rows, cols // 4, 4)
                z = zero.view(rows, cols // 4, 4)
                kept_min = torch.where(z, torch.inf, g).amin(-1)
                pruned_max = torch.where(z, g, -torch.inf).amax(-1)
                assert (kept_min >= pruned_max).all(), name
        if method == "sparsegpt":  # SparseGPT moves the pruned weights' error onto the kept ones
            assert not torch.equal(w[~zero], orig[~zero]), name

    # nothing else moved: embeddings, LM head, norms, biases, positional tables
    after = model.state_dict()
    assert set(after) == set(before)
    for k, v in after.items():
        if k not in weight_keys:
            assert torch.equal(v, before[k]), k
    emb = model.get_input_embeddings().weight
    head = model.get_output_embeddings().weight
    assert (emb != 0).all() and (head != 0).all()


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_same_seed_same_settings_same_weights(method):
    results = []
    for _ in range(2):
        model = make_tiny_model("gemma3_text", seed=3)
        prunekit.prune(model, None, _config(method, "0.5"), calib_ids=random_ids(4, 16, seed=3), progress=False)
        results.append({k: v.clone() for k, v in model.state_dict().items()})
    assert results[0].keys() == results[1].keys()
    for k in results[0]:
        assert torch.equal(results[0][k], results[1][k]), k
    # and the calibration data matters: other windows give other weights
    model = make_tiny_model("gemma3_text", seed=3)
    prunekit.prune(model, None, _config(method, "0.5"), calib_ids=random_ids(4, 16, seed=4), progress=False)
    assert any(not torch.equal(v, results[0][k]) for k, v in model.state_dict().items())


def _reference_prune(model, ids, method: str, sequential: bool = True):
    """The layer-wise recipe done the slow, obvious way: for block i, run the whole model (blocks
    before i already pruned, unless ``sequential`` is False) and hook every linear's input."""
    layout, _ = _linear_weights(model)
    dense_inputs = None
    for i in range(len(layout.blocks)):
        lins = layout.block_linears(i)
        stats = {n: InputStats(weight_matrix(m).shape[1], True, torch.device("cpu")) for n, m in lins.items()}
        handles = [
            m.register_forward_pre_hook(lambda _m, inp, st=stats[n]: st.add_batch(inp[0])) for n, m in lins.items()
        ]
        with torch.no_grad():
            if sequential or dense_inputs is None:
                model(input_ids=ids, use_cache=False)
        for h in handles:
            h.remove()
        if not sequential:
            if dense_inputs is None:  # collect every block's dense inputs in one pass, before pruning
                dense_inputs = {}
                handles = []
                for j in range(len(layout.blocks)):
                    for n, m in layout.block_linears(j).items():
                        st = InputStats(weight_matrix(m).shape[1], True, torch.device("cpu"))
                        dense_inputs[(j, n)] = st
                        handles.append(m.register_forward_pre_hook(lambda _m, inp, st=st: st.add_batch(inp[0])))
                with torch.no_grad():
                    model(input_ids=ids, use_cache=False)
                for h in handles:
                    h.remove()
            stats = {n: dense_inputs[(i, n)] for n in lins}
        for n, m in lins.items():
            w = weight_matrix(m)
            if method == "wanda":
                w.mul_(unstructured_mask(wanda_scores(w, stats[n].sq_norms), 0.5, "row"))
            else:
                w.copy_(sparsegpt_prune(w, stats[n].hessian, prunekit.parse_sparsity("0.5")).weight)


@pytest.mark.parametrize("family", [f for f in FAMILIES if f != "gpt2"])
def test_wanda_matches_a_sequential_reference(family):
    """Block 1 is calibrated on the outputs of the *pruned* block 0, with the right inputs per linear."""
    model = make_tiny_model(family)
    prunekit.prune(model, None, _config("wanda", "0.5"), calib_ids=CALIB, progress=False)
    ref = make_tiny_model(family)
    _reference_prune(ref, CALIB, "wanda")
    _, got = _linear_weights(model)
    _, want = _linear_weights(ref)
    for name in got:
        assert torch.equal(got[name][1] == 0, want[name][1] == 0), name
        assert torch.equal(got[name][1], want[name][1]), name
    if family == "llama":  # the sequential order is visible: dense inputs for block 1 give other masks
        dense_ref = make_tiny_model(family)
        _reference_prune(dense_ref, CALIB, "wanda", sequential=False)
        _, other = _linear_weights(dense_ref)
        block1 = [n for n in got if ".1." in n]
        assert any(not torch.equal(got[n][1] == 0, other[n][1] == 0) for n in block1)


@pytest.mark.parametrize("family", ["llama", "gemma3_text", "opt"])
def test_sparsegpt_matches_a_sequential_reference(family):
    model = make_tiny_model(family)
    prunekit.prune(model, None, _config("sparsegpt", "0.5"), calib_ids=CALIB, progress=False)
    ref = make_tiny_model(family)
    _reference_prune(ref, CALIB, "sparsegpt")
    _, got = _linear_weights(model)
    _, want = _linear_weights(ref)
    for name in got:
        torch.testing.assert_close(got[name][1], want[name][1], atol=1e-4, rtol=1e-4, msg=name)


def test_magnitude_needs_no_calibration_data():
    model = make_tiny_model("llama")
    _, report = prunekit.prune(model, None, _config("magnitude", "0.5"), progress=False)
    assert any("no calibration" in n for n in report.notes)
    assert len(report.per_layer) == 14


def test_unstructured_fraction_that_is_not_exact():
    model = make_tiny_model("qwen3")
    _, report = prunekit.prune(model, None, _config("wanda", "0.3"), calib_ids=CALIB, progress=False)
    _, linears = _linear_weights(model)
    for name, (_, w) in linears.items():
        cols = w.shape[1]
        assert report.per_layer[name] == pytest.approx(int(cols * 0.3) / cols)
        assert ((w == 0).sum(1) == int(cols * 0.3)).all()


def test_wanda_per_layer_scope_and_other_nm():
    model = make_tiny_model("mistral")
    _, report = prunekit.prune(model, None, _config("wanda", "0.5", scope="layer"), calib_ids=CALIB, progress=False)
    assert report.scope == "layer"
    _, linears = _linear_weights(model)
    rows_uneven = False
    for _, (_, w) in linears.items():
        assert (w == 0).sum().item() == w.numel() // 2
        rows_uneven |= bool(((w == 0).sum(1) != w.shape[1] // 2).any())
    assert rows_uneven  # per layer, rows do not all lose exactly half

    model = make_tiny_model("llama")
    _, report = prunekit.prune(model, None, _config("sparsegpt", "1:4", blocksize=8), calib_ids=CALIB, progress=False)
    assert all(v == pytest.approx(0.75) for v in report.per_layer.values())
    for _, (_, w) in _linear_weights(model)[1].items():
        assert ((w != 0).view(w.shape[0], -1, 4).sum(-1) == 1).all()


@pytest.mark.parametrize(
    "setting,value",
    [("method", "obs"), ("sparsity", "1.5"), ("sparsity", "4:2"), ("scope", "column"), ("percdamp", 0.0)],
)
def test_prune_rejects_bad_settings(setting, value):
    model = make_tiny_model("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = _config("wanda", "0.5")
    setattr(cfg.sparsity, setting, value)
    with pytest.raises(prunekit.PrunekitError):
        prunekit.prune(model, None, cfg, calib_ids=CALIB, progress=False)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_nm_that_does_not_divide_the_inputs_is_a_clear_error():
    model = make_tiny_model("llama")
    with pytest.raises(prunekit.PrunekitError, match="cannot hold"):
        prunekit.prune(model, None, _config("magnitude", "2:5"), progress=False)


# ----------------------------------------------------------------------------- perplexity


@pytest.mark.parametrize("family", ["llama", "gemma2", "opt", "gpt2"])
def test_window_losses_match_the_model_loss(family):
    model = make_tiny_model(family)
    windows = random_ids(3, 12, seed=9)
    losses = window_losses(model, windows, batch_size=2, device="cpu")
    assert len(losses) == 3
    with torch.no_grad():
        for row, loss in zip(windows, losses):
            logits = model(input_ids=row[None], use_cache=False).logits[0]  # softcapped in Gemma 2
            want = F.cross_entropy(logits[:-1].float(), row[1:]).item()
            assert loss == pytest.approx(want, rel=1e-5, abs=1e-5)
    ppl = perplexity_of_ids(model, "tiny", windows, batch_size=3, device="cpu")
    assert ppl.ppl == pytest.approx(math.exp(sum(losses) / 3), rel=1e-6)
    assert (ppl.windows, ppl.seqlen) == (3, 12)
    assert ppl.ppl_first(1) == pytest.approx(math.exp(losses[0]), rel=1e-6)


def test_perplexity_of_no_windows_is_an_error():
    with pytest.raises(prunekit.PrunekitError):
        perplexity_of_ids(make_tiny_model("llama"), "empty", torch.zeros(0, 8, dtype=torch.long), 2, "cpu")


def test_pruned_model_still_runs_and_is_not_identical():
    model = make_tiny_model("gemma3_text")
    windows = random_ids(2, 12, seed=11)
    dense = window_losses(model, windows, 2, "cpu")
    prunekit.prune(model, None, _config("sparsegpt", "2:4"), calib_ids=CALIB, progress=False)
    sparse = window_losses(model, windows, 2, "cpu")
    assert all(math.isfinite(x) for x in sparse)
    assert sparse != dense
    assert all(is_linear(m) is False or (weight_matrix(m) == 0).any() for m in model.model.layers.modules())


# ----------------------------------------------------------------------------- saving and loading


class _TokenizerStub:
    def __init__(self) -> None:
        self.saved_to = None

    def save_pretrained(self, directory: str) -> None:
        self.saved_to = directory


def test_pruned_model_saves_and_reloads(tmp_path):
    from transformers import AutoModelForCausalLM

    from prunekit.models import save_model

    model = make_tiny_model("qwen2")
    prunekit.prune(model, None, _config("wanda", "2:4"), calib_ids=CALIB, progress=False)
    tok = _TokenizerStub()
    save_model(model, tok, tmp_path / "out")
    assert tok.saved_to == str(tmp_path / "out")
    assert model.config.use_cache is False
    again = AutoModelForCausalLM.from_pretrained(str(tmp_path / "out")).eval()
    assert again.config.use_cache is True
    want = model.state_dict()
    for k, v in again.state_dict().items():
        assert torch.equal(v, want[k]), k
    ids = random_ids(2, 8, seed=1)
    with torch.no_grad():
        torch.testing.assert_close(again(input_ids=ids).logits, model(input_ids=ids).logits)


def test_model_helpers():
    from prunekit.models import context_length, load_model, resolve_alias

    assert context_length(make_tiny_model("llama")) == 64
    assert context_length(make_tiny_model("gpt2")) == 64
    assert resolve_alias("some/hub-id") == "some/hub-id"
    with pytest.raises(prunekit.PrunekitError, match="does not exist"):
        load_model("./no-such-model-dir")
    with pytest.raises(prunekit.PrunekitError, match="dtype"):
        load_model("./no-such-model-dir", dtype="int4")


def test_default_reconstructs_with_the_quick_preset():
    """The library and CLI default is the main job's: BR+GP+CR for one epoch (preset "quick")."""
    cfg = PruneConfig(batch_size=2, device="cpu")
    r = cfg.recon.validate()
    assert (r.recon, r.granularity, r.targets, r.epochs, r.lr, r.recon_batch_size) == ("quick", "block", "global", 1, 1e-3, 1)
    assert (r.window, r.stride, r.recompute_masks) == (2, 1, True)
    model = make_tiny_model("llama")
    orig = {k: v.clone() for k, v in model.state_dict().items()}
    pruned, report = prunekit.prune(model, None, cfg, calib_ids=CALIB, progress=False)
    assert len(report.units) == len(pruned.model.layers) + 1  # windows [0], [0,1], ..., [L-2,L-1], [L-1]
    assert all(u.steps == 4 for u in report.units)  # 1 epoch over the 4 training windows of 5 (1 held out), batch 1
    w = pruned.model.layers[0].mlp.down_proj.weight
    kept = w != 0
    assert not torch.equal(w[kept], orig["model.layers.0.mlp.down_proj.weight"][kept])  # the kept weights moved
