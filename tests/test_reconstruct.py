"""Reconstruction: units, masks held fixed, propagation choices, solvers, guards."""

from __future__ import annotations

import pytest
import torch
from conftest import FAMILIES, make_tiny_model, random_ids

import prunekit
from prunekit.capture import capture
from prunekit.config import PruneConfig
from prunekit.families import discover, weight_matrix
from prunekit.pipeline import windows
from prunekit.config import ReconConfig
from prunekit.reconstruct import FitData, Point, Unit, Window, _lstsq, build_units
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

CALIB = random_ids(6, 16, seed=3)


def _cfg(recon: str = "br", method: str = "wanda", sparsity: str = "0.5", **kw) -> PruneConfig:
    cfg = PruneConfig(batch_size=2, device="cpu")
    cfg.sparsity.method = method
    cfg.sparsity.sparsity = sparsity
    cfg.recon.recon = recon
    for k, v in kw.items():
        setattr(cfg.recon, k, v)
    return cfg


def _linear_weights(model) -> dict[str, torch.Tensor]:
    layout = discover(model)
    return {
        f"{i}.{n}": weight_matrix(m).clone()
        for i in range(len(layout.blocks))
        for n, m in layout.block_linears(i).items()
    }


def test_window_plan_matches_the_papers():
    assert windows(3, 1, 1) == [(0, 1), (1, 2), (2, 3)]
    assert windows(4, 2, 1) == [(0, 1), (0, 2), (1, 3), (2, 4), (3, 4)]  # CR: [0], [0,1], ..., [L-1]
    assert windows(4, 2, 2) == [(0, 2), (2, 4)]


GRANULARITIES = [("block", 1), ("attn-mlp", 1), ("matrix", 1), ("block", 2)]
# every family in fp32 and bf16 (autocast, also on the CPU); tf32 is fp32 on a CPU: a few families
# check that its path runs (on a GPU the same tests cover TF32 with --device cuda)
PRECISION_FAMILIES = [(f, p) for p in ("fp32", "bf16") for f in FAMILIES] + [(f, "tf32") for f in ("llama", "gpt2", "opt")]


@pytest.mark.parametrize(("family", "precision"), PRECISION_FAMILIES)
@pytest.mark.parametrize(("granularity", "window"), GRANULARITIES)
def test_pruned_weights_stay_zero_and_kept_weights_move(family, precision, granularity, window):
    lr_cfg = _cfg("lr")
    lr_cfg.precision = precision
    lr_model, _ = prunekit.prune(make_tiny_model(family), None, lr_cfg, calib_ids=CALIB, progress=False)
    lr_weights = _linear_weights(lr_model)
    cfg = _cfg("br-gp", granularity=granularity, window=window, epochs=2, lr=1e-2, holdout=0.0)
    cfg.precision = precision
    model, report = prunekit.prune(make_tiny_model(family), None, cfg, calib_ids=CALIB, progress=False)
    after = _linear_weights(model)
    layout = discover(model)
    assert len(report.per_layer) == sum(len(layout.block_linears(i)) for i in range(len(layout.blocks)))
    for name, w in after.items():  # Wanda prunes half of every row; training never revives a weight
        assert ((w == 0).sum(1) >= w.shape[1] // 2).all(), name
    moved = sum(not torch.equal(after[n], lr_weights[n]) for n in after)
    assert moved > 0, "reconstruction changed no kept weight"
    assert all(abs(v - 0.5) < 0.05 for v in report.per_layer.values())
    assert report.units and all(u.steps > 0 for u in report.units)


@pytest.mark.parametrize("precision", ["fp32", "tf32", "bf16"])
@pytest.mark.parametrize("family", ["llama", "gpt2", "opt"])
@pytest.mark.parametrize(("granularity", "window"), GRANULARITIES)
def test_pruned_weights_are_zero_after_every_optimizer_step(family, granularity, window, precision):
    """Checked inside the loop: a mask that leaked for one step and was re-applied at the end would fail."""
    zeros: dict[int, torch.Tensor] = {}
    checked = []

    def before(opt, *_):
        for group in opt.param_groups:
            for p in group["params"]:
                if p.dim() == 2 and not opt.state.get(p):  # a new unit's first step (CR re-masks a block)
                    zeros[id(p)] = p.detach() == 0

    def after(opt, *_):
        for group in opt.param_groups:
            for p in group["params"]:
                if p.dim() == 2:
                    assert zeros[id(p)].float().mean() >= 0.45, "a linear weight was trained without its mask"
                    assert not p.detach()[zeros[id(p)]].any(), "a pruned weight moved during a step"
                    checked.append(1)

    cfg = _cfg("br-gp", granularity=granularity, window=window, epochs=2, lr=1e-1, holdout=0.0)
    cfg.precision = precision
    hooks = [register_optimizer_step_pre_hook(before),
             register_optimizer_step_post_hook(after)]
    try:
        prunekit.prune(make_tiny_model(family), None, cfg, calib_ids=CALIB, progress=False)
    finally:
        for h in hooks:
            h.remove()
    assert checked


@pytest.mark.parametrize("family", FAMILIES)
def test_attention_then_mlp_part_equals_the_block(family):
    model = make_tiny_model(family)
    layout = discover(model)
    ids = random_ids(3, 16, seed=1)
    cap = capture(model, layout.blocks, ids, 3, "cpu", progress=False)
    win = Window([layout.blocks[0]], [0], cap, torch.device("cpu"))
    attn, mlp = build_units(layout, win, "attn-mlp", "m")
    with torch.no_grad():
        whole = win.run(cap.hidden)
        parts = mlp.forward(attn.forward(cap.hidden))
        mid = win.value_at(cap.hidden, attn.output)
    torch.testing.assert_close(parts, whole, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(attn.forward(cap.hidden).detach(), mid)
    lin_names = set(attn.linears) | set(mlp.linears)
    assert len(lin_names) == len(layout.block_linears(0))
    assert not set(attn.linears) & set(mlp.linears)


def test_reconstruction_lowers_calibration_error_and_gp_differs_from_local():
    results = {}
    for preset in ("br", "br-gp"):
        cfg = _cfg(preset, epochs=5, lr=5e-3, holdout=0.0)
        model, report = prunekit.prune(make_tiny_model("llama"), None, cfg, calib_ids=CALIB, progress=False)
        summary = report.error_summary()
        assert summary["calib_after"] < summary["calib_before"]
        results[preset] = _linear_weights(model)
    assert any(not torch.equal(results["br"][k], results["br-gp"][k]) for k in results["br"])


def test_dense_inputs_differ_from_sparse_inputs():
    out = {}
    for inputs in ("sparse", "dense"):
        cfg = _cfg("attn-mlp-gp", inputs=inputs, targets="local", epochs=2, lr=5e-3, holdout=0.0)
        model, _ = prunekit.prune(make_tiny_model("qwen2"), None, cfg, calib_ids=CALIB, progress=False)
        out[inputs] = _linear_weights(model)
    # block 0 sees the same inputs either way; later blocks do not
    assert any(not torch.equal(out["sparse"][k], out["dense"][k]) for k in out["sparse"] if k.startswith("1."))


def test_lstsq_matches_a_direct_solve_per_row():
    torch.manual_seed(0)
    lin = torch.nn.Linear(12, 5, bias=True)
    x = torch.randn(4, 10, 12) @ torch.randn(12, 12)  # correlated inputs
    y = torch.randn(4, 10, 5)
    mask = torch.rand(5, 12) > 0.5
    unit = Unit("lin", [lin], {"lin": lin}, Point(lin), Point(lin, True), lin)
    _lstsq(unit, {"lin": mask}, FitData(x, y, torch.arange(4), torch.arange(0), 2, torch.device("cpu")))
    xf = x.reshape(-1, 12).double()
    yf = y.reshape(-1, 5).double()
    for r in range(5):
        cols = mask[r].nonzero().flatten()
        a = torch.cat([xf[:, cols], torch.ones(xf.shape[0], 1, dtype=xf.dtype)], 1)
        sol = torch.linalg.lstsq(a, yf[:, r : r + 1]).solution.flatten()
        torch.testing.assert_close(lin.weight[r, cols].double(), sol[:-1], rtol=1e-3, atol=1e-4)
        torch.testing.assert_close(lin.bias[r].double(), sol[-1], rtol=1e-3, atol=1e-4)
        assert (lin.weight[r, ~mask[r]] == 0).all()


def test_lstsq_lowers_matrix_error_more_than_nothing():
    cfg = _cfg("br-gp", granularity="matrix", solver="lstsq", targets="local", holdout=0.0)
    _, report = prunekit.prune(make_tiny_model("opt"), None, cfg, calib_ids=CALIB, progress=False)
    for u in report.units:
        assert u.calib_after <= u.calib_before + 1e-9


def test_masked_lora_merges_with_exact_sparsity():
    cfg = _cfg("br", lora_rank=4, epochs=2, lr=1e-2, holdout=0.0, sparsity="0.5")
    before = _linear_weights(prunekit.prune(make_tiny_model("gpt2"), None, _cfg("lr"), calib_ids=CALIB, progress=False)[0])
    model, report = prunekit.prune(make_tiny_model("gpt2"), None, cfg, calib_ids=CALIB, progress=False)
    after = _linear_weights(model)
    for k in after:
        assert torch.equal(after[k] == 0, before[k] == 0) or abs((after[k] == 0).float().mean() - 0.5) < 1e-6
    assert any(not torch.equal(after[k], before[k]) for k in after)
    assert not any("parametrizations" in n for n, _ in model.named_parameters())


def test_nm_sparsity_survives_reconstruction():
    cfg = _cfg("attn-mlp-gp", sparsity="2:4", epochs=2, lr=1e-2, holdout=0.0)
    model, _ = prunekit.prune(make_tiny_model("mistral"), None, cfg, calib_ids=CALIB, progress=False)
    for name, w in _linear_weights(model).items():
        assert ((w.view(w.shape[0], -1, 4) != 0).sum(-1) <= 2).all(), name


@pytest.mark.parametrize("holdout", [0.0, 0.34])  # 0: fit's own CPU copy; 0.34: the guard's snapshot puts them back
def test_non_finite_loss_falls_back_to_pre_reconstruction_weights(holdout):
    lr_cfg = _cfg("lr", holdout=holdout, measure_error=True)  # the same training windows choose the masks
    lr_model, _ = prunekit.prune(make_tiny_model("llama"), None, lr_cfg, calib_ids=CALIB, progress=False)
    cfg = _cfg("br", epochs=1, lr=1e30, holdout=holdout)
    model, report = prunekit.prune(make_tiny_model("llama"), None, cfg, calib_ids=CALIB, progress=False)
    assert sum("NaN or inf" in n for n in report.notes) == 2  # both blocks
    lr_state = lr_model.state_dict()
    for k, v in model.state_dict().items():  # every weight, norms included, is the masks-only one
        assert torch.equal(v, lr_state[k]), k


def test_heldout_split_and_early_stop_keep_the_best_epoch():
    cfg = _cfg("br-gp", epochs=6, lr=3e-2, holdout=0.34, early_stop=True, patience=1)
    _, report = prunekit.prune(make_tiny_model("llama"), None, cfg, calib_ids=CALIB, progress=False)
    assert report.heldout_windows == 2
    for u in report.units:
        assert u.heldout_before is not None and u.heldout_after is not None
        assert u.heldout_after <= u.heldout_before + 1e-12  # never worse: best epoch or fallback
        if u.best_epoch is not None and not u.note:
            assert u.heldout_after == pytest.approx(min(u.heldout_curve), rel=1e-5)
        assert len(u.loss_curve) <= 6


def test_same_seed_same_reconstructed_model():
    runs = []
    for _ in range(2):
        cfg = _cfg("br-gp-cr", epochs=2, lr=1e-2, holdout=0.2)
        model, _ = prunekit.prune(make_tiny_model("gemma2"), None, cfg, calib_ids=CALIB, progress=False)
        runs.append(_linear_weights(model))
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])


def test_lr_preset_measures_errors_only_when_asked():
    _, plain = prunekit.prune(make_tiny_model("llama"), None, _cfg("lr"), calib_ids=CALIB, progress=False)
    assert plain.units == [] and plain.heldout_windows == 0
    _, measured = prunekit.prune(
        make_tiny_model("llama"), None, _cfg("lr", measure_error=True), calib_ids=CALIB, progress=False
    )
    assert len(measured.units) == 2 and all(u.calib_after == u.calib_before for u in measured.units)


@pytest.mark.parametrize(
    ("kw", "needle"),
    [
        ({"recon": "bogus"}, "unknown reconstruction preset"),
        ({"granularity": "attn-mlp", "window": 2}, "need --granularity block"),
        ({"window": 1, "stride": 2}, "exceeds window"),
        ({"solver": "lstsq"}, "needs --granularity matrix"),
        ({"holdout": 1.0}, "outside [0, 1)"),
    ],
)
def test_bad_reconstruction_settings(kw, needle):
    rc = ReconConfig(**{"recon": "br", **kw})
    with pytest.raises(prunekit.PrunekitError, match=needle.replace("[", r"\[").replace(")", r"\)")):
        rc.validate()


def test_memory_mapped_streams_give_the_same_model():
    runs = []
    for offload in ("ram", "disk"):
        cfg = _cfg("br-gp", epochs=2, lr=1e-2, holdout=0.0)
        cfg.offload = offload
        model, _ = prunekit.prune(make_tiny_model("llama"), None, cfg, calib_ids=CALIB, progress=False)
        runs.append(_linear_weights(model))
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])


def test_block_errors_grow_from_zero_for_the_dense_model(tmp_path):
    from prunekit.evaluate import block_errors
    from prunekit.report import plot_block_errors

    dense = make_tiny_model("llama", layers=3)
    ids = random_ids(4, 16, seed=5)
    assert block_errors(dense, make_tiny_model("llama", layers=3), ids, 2, "cpu") == [0.0, 0.0, 0.0]
    pruned, _ = prunekit.prune(make_tiny_model("llama", layers=3), None, _cfg("lr"), calib_ids=CALIB, progress=False)
    errs = block_errors(dense, pruned, ids, 2, "cpu")
    assert all(e > 0 for e in errs)
    assert plot_block_errors({"lr": errs}, tmp_path / "p.png") and (tmp_path / "p.png").stat().st_size > 1000


class CharTokenizer:
    """Letters a-z as ids 0-25 (enough for the self-generation recipe on a tiny model)."""

    all_special_ids = [26]
    pad_token_id = 26
    eos_token_id = 26

    def decode(self, ids) -> str:
        return "".join(chr(97 + int(i) % 26) for i in ids)


def test_calib_mix_takes_the_given_share_of_self_generated_windows(tmp_path):
    from prunekit.config import CalibConfig
    from prunekit.pipeline import calibration_ids

    docs = tmp_path / "docs.jsonl"
    docs.write_text("\n".join('{"text": "%s"}' % " ".join(["100"] * 40) for _ in range(3)) + "\n")

    class NumTok(CharTokenizer):
        def __call__(self, text):
            return {"input_ids": [int(w) for w in text.split()]}

    model = make_tiny_model("llama")
    calib = CalibConfig(calib=str(docs), nsamples=4, seqlen=12, seed=0, calib_mix=0.5, gen_batch_size=2, cache_dir=str(tmp_path))
    ids = calibration_ids(model, NumTok(), calib, torch.device("cpu"))
    assert ids.shape == (4, 12)
    real = [bool((row == 100).all()) for row in ids]
    assert sum(real) == 2  # half real windows (all token 100), half written by the model
    again = calibration_ids(model, NumTok(), calib, torch.device("cpu"))
    assert torch.equal(ids, again)  # same seed: same windows (the generated half from the cache)
    assert len(list((tmp_path / "selfgen").glob("*.pt"))) == 1


def test_counted_flops_are_the_linears_forward_backward_plus_heldout_forward():
    cfg = _cfg("br", granularity="matrix", epochs=2, lr=1e-3, holdout=0.34)
    model, report = prunekit.prune(make_tiny_model("llama"), None, cfg, calib_ids=CALIB, progress=False)
    held = report.heldout_windows
    assert 0 < held < len(CALIB)
    train_tokens = (len(CALIB) - held) * CALIB.shape[1]
    layout = discover(model)
    numel = {f"model.layers.{i}.{n}": m.weight.numel() for i in range(len(layout.blocks)) for n, m in layout.block_linears(i).items()}
    for u in report.units:
        per_token = 2 * numel[u.unit]
        expected = cfg.recon.epochs * (3 * per_token * train_tokens + per_token * held * CALIB.shape[1])
        assert u.flops == pytest.approx(expected), u.unit


def _trained_unit(stepper: str, lean: bool = False) -> tuple[dict[str, torch.Tensor], int]:
    """A tiny MLP unit trained 2 epochs with one of the two step loops; its weights and the most
    gradients that existed at once during any backward pass."""
    from prunekit.reconstruct import _StepAfterBackward, _StepInBackward, _adam
    import prunekit.reconstruct as R

    torch.manual_seed(0)
    a, b = torch.nn.Linear(12, 20), torch.nn.Linear(20, 6)
    seq = torch.nn.Sequential(a, torch.nn.GELU(), b)
    masks = {"a": torch.rand(20, 12) > 0.5, "b": torch.rand(6, 20) > 0.5}
    unit = Unit("mlp", [seq], {"a": a, "b": b}, Point(seq), Point(seq, True), seq)
    x, y = torch.randn(8, 5, 12), torch.randn(8, 5, 6)
    data = FitData(x, y, torch.arange(6), torch.arange(6, 8), 2, torch.device("cpu"), lean=lean)
    most = [0]

    def count(_p):
        most[0] = max(most[0], sum(p.grad is not None for p in seq.parameters()))

    hooks = [p.register_post_accumulate_grad_hook(count) for p in seq.parameters()]
    chosen = {"in": _StepInBackward, "after": _StepAfterBackward}[stepper]
    orig = (R._StepAfterBackward, R._StepInBackward)
    R._StepAfterBackward = R._StepInBackward = chosen  # type: ignore[misc]
    try:
        cfg = ReconConfig(recon="br", epochs=2, lr=1e-2)
        record = R.UnitRecord("mlp", 0.0, 0.0, None, None)
        assert not _adam(unit, masks, data, cfg, 7, R.Objective("mse"), record, lambda rows: 1.0, None)
    finally:
        R._StepAfterBackward, R._StepInBackward = orig
        for h in hooks:
            h.remove()
    assert all(p.grad is None for p in seq.parameters())
    return {k: v.clone() for k, v in seq.state_dict().items()}, most[0]


def test_stepping_in_backward_equals_one_step_over_all_parameters_and_frees_each_gradient():
    """Issue 12: AdamW applied per parameter inside the backward pass gives the same weights to the
    bit as one AdamW step after it, while never more than one gradient exists at a time."""
    after, most_after = _trained_unit("after")
    inside, most_inside = _trained_unit("in")
    lean, _ = _trained_unit("in", lean=True)  # bool hold masks multiplied in chunks: the same products
    for k in after:
        assert after[k].numpy().tobytes() == inside[k].numpy().tobytes() == lean[k].numpy().tobytes(), k
    assert most_after == 4 and most_inside == 1  # two weights and two biases: all of them vs one


def test_bool_mask_multiply_in_chunks_equals_the_float_multiply(monkeypatch):
    """The lean path's chunked bool-to-float multiply (prunekit.reconstruct.mask_) gives the bytes of
    a float multiply, -0.0 included, on a transposed (Conv1D-style) mask and chunks that split rows."""
    import prunekit.reconstruct as R

    monkeypatch.setattr(R, "_CHUNK", 7)  # fewer elements than one row: one row per chunk
    for shape, transposed in (((9, 13), False), ((13, 9), True), ((3, 40), False)):
        t = torch.randn(*shape)
        mask = torch.rand(*(shape[::-1] if transposed else shape)) > 0.5
        mask = mask.t() if transposed else mask
        ref, got = t.clone(), t.clone()
        ref.mul_(mask.float())
        R.mask_(got, mask)
        assert got.numpy().tobytes() == ref.numpy().tobytes()
        assert (got[~mask] == 0).all() and torch.equal(got[mask], t[mask])


def test_step_in_backward_where_memory_is_the_limit():
    """A CPU run with the model in RAM keeps the one fused step (faster there); a streamed (lean)
    run steps in the backward pass; so does a GPU run (checked by device type, no GPU needed)."""
    from prunekit.reconstruct import _steps_in_backward

    x = torch.zeros(2, 3, 4)
    data = FitData(x, x, torch.arange(2), torch.arange(0), 1, torch.device("cpu"))
    assert not _steps_in_backward(data)
    data.lean = True
    assert _steps_in_backward(data)
    data.lean, data.device = False, torch.device("cuda")
    assert _steps_in_backward(data)
