"""--precision (fp32 / tf32 / bf16 autocast) and --stream-dtype (bfloat16 activation streams), issue 12.

Masks staying exact in every mode is checked in test_reconstruct.py (the stay-zero tests are
parametrized over the precisions); bad values on the command line in test_cli.py.
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import make_tiny_model, random_ids

import prunekit
from prunekit import precision
from prunekit.checkpoint import Checkpointer
from prunekit.cli import main
from prunekit.config import PruneConfig, RunConfig
from prunekit.criteria import InputStats
from prunekit.families import discover
from prunekit.losses import Objective
from prunekit.run import settings_fingerprint
from prunekit.streams import StreamAllocator
from test_hardening import one_error_line, tiny_args
from torch.optim.optimizer import register_optimizer_step_post_hook

CALIB = random_ids(6, 16, seed=3)


def _cfg(precision_: str = "fp32", streams: str = "float32", recon: str = "br-gp", **kw) -> PruneConfig:
    cfg = PruneConfig(batch_size=2, device="cpu", precision=precision_, stream_dtype=streams)
    cfg.recon.recon = recon
    if recon != "lr":
        cfg.recon.epochs, cfg.recon.lr = 3, 5e-3
    for k, v in kw.items():
        setattr(cfg.recon, k, v)
    return cfg


def _fake_gpu(monkeypatch, bf16: bool = True) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)


# ----------------------------------------------------------------------------- resolving the mode


def test_auto_is_bf16_on_a_gpu_that_has_it_and_fp32_elsewhere(monkeypatch):
    assert precision.resolve("auto", "cpu") == "fp32"
    assert precision.resolve("tf32", "cpu") == "fp32"  # TF32 exists on CUDA GPUs only
    assert precision.resolve("bf16", "cpu") == "bf16"  # autocast works on the CPU too
    assert precision.resolve("fp32", torch.device("cpu")) == "fp32"
    _fake_gpu(monkeypatch)
    assert precision.resolve("auto", "cuda") == "bf16"
    assert precision.resolve("auto", "auto") == "bf16"
    assert precision.resolve("auto", "cuda:1") == "bf16"
    assert precision.resolve("tf32", "cuda") == "tf32"
    assert precision.resolve("auto", "cpu") == "fp32"  # a GPU that is there but not asked for
    _fake_gpu(monkeypatch, bf16=False)
    assert precision.resolve("auto", "cuda") == "fp32"  # e.g. a V100


def test_the_mode_is_set_for_the_run_only_and_restored_after_an_error():
    seen = []
    real = Objective.loss

    def loss(self, y, t):
        seen.append(precision.current())
        raise RuntimeError("stop")

    cfg = _cfg("bf16")
    Objective.loss = loss
    try:
        with pytest.raises(RuntimeError, match="stop"):
            prunekit.prune(make_tiny_model("llama"), None, cfg, calib_ids=CALIB, progress=False)
    finally:
        Objective.loss = real
    assert seen == ["bf16"] and precision.current() == "fp32"


def test_tf32_flags_are_set_for_forward_passes_and_restored():
    before = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        with precision.use("tf32"):
            with precision.forward("cuda"):
                assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
                with precision.exact("cuda"):  # statistics: TF32 off inside the pass
                    assert not torch.backends.cuda.matmul.allow_tf32
                assert torch.backends.cuda.matmul.allow_tf32
            with precision.forward("cpu"):  # no TF32 on a CPU
                assert not torch.backends.cuda.matmul.allow_tf32
        assert not torch.backends.cuda.matmul.allow_tf32
        with precision.forward("cuda"):  # outside a run: fp32
            assert not torch.backends.cuda.matmul.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


# ----------------------------------------------------------------------------- what bf16 does


@pytest.mark.parametrize(("method", "granularity"), [("wanda", "matrix"), ("sparsegpt", "block")])
def test_bf16_autocasts_the_passes_with_float32_weights_loss_optimizer_and_statistics(method, granularity):
    """Linears compute in bf16 in every forward pass; what is trained, the loss, AdamW's moments and
    the input statistics stay float32 (the statistics outside autocast)."""
    model = make_tiny_model("llama")
    layout = discover(model)
    outputs: set[torch.dtype] = set()
    for j in range(len(layout.blocks)):
        for lin in layout.block_linears(j).values():
            lin.register_forward_hook(lambda _m, _i, out: outputs.add(out.dtype))
    stats, losses, states = [], [], []
    real_add, real_loss = InputStats._add, Objective.loss

    def add(self, x):
        stats.append((x.dtype, torch.is_autocast_enabled("cpu")))
        real_add(self, x)

    def loss(self, y, t):
        out = real_loss(self, y, t)
        losses.append((y.dtype, t.dtype, out.dtype))
        return out

    def after_step(opt, *_):
        states.extend((p.dtype, s["exp_avg"].dtype, s["exp_avg_sq"].dtype) for p, s in opt.state.items())

    handle = register_optimizer_step_post_hook(after_step)
    InputStats._add, Objective.loss = add, loss
    try:
        cfg = _cfg("bf16", granularity=granularity)  # a single linear's output is bf16 under autocast
        cfg.sparsity.method = method
        prunekit.prune(model, None, cfg, calib_ids=CALIB, progress=False)
    finally:
        InputStats._add, Objective.loss = real_add, real_loss
        handle.remove()
    assert torch.bfloat16 in outputs, "no linear ran under bf16 autocast"
    assert stats and all(dtype == torch.float32 and not autocast for dtype, autocast in stats)
    assert losses and all(d == torch.float32 for triple in losses for d in triple)
    assert states and all(d == torch.float32 for triple in states for d in triple)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert torch.is_autocast_enabled("cpu") is False


def test_fp32_runs_no_linear_in_bf16():
    model = make_tiny_model("llama")
    outputs: set[torch.dtype] = set()
    for m in model.modules():
        if isinstance(m, torch.nn.Linear):
            m.register_forward_hook(lambda _m, _i, out: outputs.add(out.dtype))
    prunekit.prune(model, None, _cfg("fp32"), calib_ids=CALIB, progress=False)
    assert outputs == {torch.float32}


@pytest.mark.parametrize("mode", ["tf32", "bf16"])
@pytest.mark.parametrize("family", ["llama", "opt"])
def test_reconstruction_in_each_precision_lowers_the_error_about_as_fp32_does(mode, family):
    results = {}
    for p in ("fp32", mode):
        _, report = prunekit.prune(make_tiny_model(family), None, _cfg(p, holdout=0.0, epochs=5, recon="br"),
                                   calib_ids=CALIB, progress=False)
        results[p] = report.error_summary()
    e = results[mode]
    assert e["calib_after"] < 0.8 * e["calib_before"]
    assert e["calib_after"] == pytest.approx(results["fp32"]["calib_after"], rel=0.1)


# ----------------------------------------------------------------------------- bfloat16 streams


def test_the_allocator_stores_float_streams_in_the_stream_dtype_only():
    for mode in ("ram", "disk"):
        half = StreamAllocator(mode, dtype=torch.bfloat16)
        full = StreamAllocator(mode)
        a, b = half.empty((3, 4, 8), torch.float32), full.empty((3, 4, 8), torch.float32)
        assert a.dtype == torch.bfloat16 and b.dtype == torch.float32
        assert a.numel() * a.element_size() * 2 == b.numel() * b.element_size()
        assert half.empty((3,), torch.int64).dtype == torch.int64  # ids are not streams
        assert full.empty((3,), torch.bfloat16).dtype == torch.bfloat16  # a bf16 model's stream stays bf16
        x = torch.randn(3, 4, 8)
        assert torch.equal(half.like(x), x.to(torch.bfloat16))
        half.close(), full.close()


def _stream_bytes(cfg: PruneConfig, monkeypatch) -> tuple[int, set[torch.dtype], torch.nn.Module, object]:
    total, dtypes = [0], set()
    real = StreamAllocator.empty

    def empty(self, shape, dtype):
        t = real(self, shape, dtype)
        total[0] += t.numel() * t.element_size()
        dtypes.add(t.dtype)
        return t

    monkeypatch.setattr(StreamAllocator, "empty", empty)
    model, report = prunekit.prune(make_tiny_model("llama", layers=3), None, cfg, calib_ids=CALIB, progress=False)
    monkeypatch.setattr(StreamAllocator, "empty", real)
    return total[0], dtypes, model, report


@pytest.mark.parametrize("granularity", ["block", "attn-mlp"])
def test_bf16_streams_take_half_the_bytes_and_give_a_close_result(granularity, monkeypatch):
    full, full_types, ref, ref_report = _stream_bytes(_cfg("fp32", granularity=granularity), monkeypatch)
    half, half_types, model, report = _stream_bytes(_cfg("fp32", "bfloat16", granularity=granularity), monkeypatch)
    assert full_types == {torch.float32} and half_types == {torch.bfloat16}
    assert half * 2 == full > 0
    dense = make_tiny_model("llama", layers=3)
    ids = random_ids(4, 16, seed=9)
    with torch.no_grad():
        y_dense, y_ref, y = (m(ids).logits for m in (dense, ref, model))
    pruning = (y_ref - y_dense).norm()
    assert (y - y_ref).norm() < 0.2 * pruning  # bf16 storage moves the result far less than pruning does (7% and 2% here)
    e, e_ref = report.error_summary(), ref_report.error_summary()
    assert e["calib_after"] == pytest.approx(e_ref["calib_after"], rel=0.05)


def test_bf16_streams_with_a_bf16_model_change_nothing():
    runs = []
    for streams in ("float32", "bfloat16"):
        model = make_tiny_model("llama").to(torch.bfloat16)
        m, _ = prunekit.prune(model, None, _cfg("fp32", streams), calib_ids=CALIB, progress=False)
        runs.append({k: v.clone() for k, v in m.state_dict().items()})
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])


# ----------------------------------------------------------------------------- resume


class Killed(Exception):
    pass


@pytest.mark.parametrize("mode", ["fp32", "bf16"])
def test_a_run_with_bf16_streams_resumes_to_the_same_model(tmp_path, mode):
    def cfg() -> PruneConfig:  # masks of the previous block in the checkpoint; streams saved after every window
        c = _cfg(mode, "bfloat16", recon="br-gp-cr")
        c.checkpoint_every = 0.0
        return c

    reference, ref_report = prunekit.prune(make_tiny_model("llama", layers=3), None, cfg(), calib_ids=CALIB, progress=False)

    def kill(k: int) -> None:
        if k == 1:
            raise Killed

    with pytest.raises(Killed):
        prunekit.prune(make_tiny_model("llama", layers=3), None, cfg(), calib_ids=CALIB, progress=False,
                       checkpoint=Checkpointer(tmp_path, "x"), on_window=kill)
    from safetensors import safe_open

    (tensors,) = tmp_path.glob("streams.w*.safetensors")
    with safe_open(str(tensors), framework="pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys() if k.startswith("stream/")} == {"BF16"}
    resumed, report = prunekit.prune(make_tiny_model("llama", layers=3), None, cfg(), progress=False,
                                     checkpoint=Checkpointer(tmp_path, "x"))
    a, b = reference.state_dict(), resumed.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert report.guard.windows == ref_report.guard.windows


def test_fingerprint_follows_what_runs(monkeypatch):
    def fp(**kw) -> str:
        cfg = RunConfig()
        cfg.prune.device = kw.pop("device", "cpu")
        for k, v in kw.items():
            setattr(cfg.prune, k, v)
        return settings_fingerprint(cfg)

    assert fp(precision="auto") == fp(precision="fp32") == fp(precision="tf32")  # all fp32 on a CPU
    assert fp(precision="bf16") != fp(precision="fp32")
    assert fp(stream_dtype="bfloat16") != fp()
    _fake_gpu(monkeypatch)
    assert fp(precision="auto", device="cuda") == fp(precision="bf16", device="cuda") != fp(precision="auto")
    assert fp(precision="tf32", device="cuda") != fp(precision="fp32", device="cuda")


def test_resuming_auto_where_it_means_another_precision_is_refused_with_the_reason(model_dir, word_text, tmp_path, monkeypatch, capsys):
    """A run begun with auto = bf16 (a GPU, faked here) and resumed where auto = fp32 (this CPU)."""
    from prunekit import checkpoint

    out = tmp_path / "run"
    real_resolve, real_save = precision.resolve, checkpoint.Checkpointer.save

    def save(self, k, *args, **kwargs):
        real_save(self, k, *args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(precision, "resolve", lambda p, d: "bf16" if p == "auto" else real_resolve(p, d))
    monkeypatch.setattr(checkpoint.Checkpointer, "save", save)
    args = tiny_args(model_dir, word_text, "--recon", "br-gp", "--epochs", "1", "--out", str(out))
    assert main(args) == 130
    monkeypatch.setattr(precision, "resolve", real_resolve)
    monkeypatch.setattr(checkpoint.Checkpointer, "save", real_save)
    capsys.readouterr()
    assert main(["prune", "--resume", str(out)]) == 2
    line = one_error_line(capsys, "trained in bf16 (--precision auto on its device), but auto means fp32 on cpu")
    assert "same kind of device" in line


def test_metrics_and_report_say_which_precision_ran(model_dir, word_text, tmp_path):
    out = tmp_path / "run"
    assert main(tiny_args(model_dir, word_text, "--recon", "br-gp", "--epochs", "1", "--stream-dtype", "bfloat16",
                          "--out", str(out))) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    s = metrics["settings"]
    assert (s["precision"], s["precision_setting"], s["stream_dtype"]) == ("fp32", "auto", "bfloat16")
    assert metrics["reconstruction"]["throughput"]["matmul_precision"] == "fp32"
    report = (out / "report.md").read_text()
    assert "| precision | fp32 (--precision auto) |" in report and "| stream dtype | bfloat16 |" in report
    assert "precision fp32, activation streams stored as bfloat16" in report
    assert "precision: auto" in (out / "config.yaml").read_text()  # the setting as given; what ran is above


def test_bad_precision_settings_are_one_line_errors():
    for kw, needle in [({"precision": "fp16"}, "unknown precision 'fp16'; choose one of auto, fp32, tf32, bf16"),
                       ({"stream_dtype": "float16"}, "unknown stream-dtype 'float16'; choose one of float32, bfloat16")]:
        cfg = PruneConfig(**kw)
        with pytest.raises(prunekit.PrunekitError, match=needle.replace("(", r"\(")):
            cfg.validate()
        with pytest.raises(prunekit.PrunekitError, match="unknown"):
            prunekit.prune(make_tiny_model("llama"), None, cfg, calib_ids=CALIB, progress=False)
