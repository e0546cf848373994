"""Fault injection: damaged inputs, a full disk, unwritable and over-long outputs, signals.

Each fault must end with one line (``prunekit: error: ...``, exit 2; ``prunekit: interrupted ...``,
exit 130, for SIGINT) and leave no half-written output directory; a run interrupted after its
first checkpoint must resume to the bit-identical model.

Read-only outputs: the tests run as root, for whom permission bits do not stop a write, so they use
paths under ``/sys``, which refuses new files even to root (``EACCES``/``EPERM``). prunekit itself
probes a directory by creating a file in it (``os.access`` would say yes to root), so the same
check works for a read-only mount. A full disk is simulated by patching the writes to raise
``ENOSPC`` (and ``shutil.disk_usage`` for the up-front check); no test needs a small file system.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from prunekit.cli import main
from test_hardening import nothing_left, one_error_line, tiny_args

READ_ONLY = Path("/sys/kernel")


def _read_only_available() -> bool:
    try:
        (READ_ONLY / ".prunekit-probe").write_text("x")
    except OSError:
        return READ_ONLY.is_dir()
    (READ_ONLY / ".prunekit-probe").unlink()
    return False


requires_read_only = pytest.mark.skipif(not _read_only_available(), reason="needs a directory even root cannot write (/sys)")


def _no_partial(parent: Path) -> None:
    assert not [p for p in parent.iterdir() if p.name.startswith(".") and p.name.endswith(".partial")]


# ----------------------------------------------------------------------------- damaged models


@pytest.fixture
def damaged_models(model_dir, tmp_path):
    """A truncated model.safetensors, a GGUF with valid magic and garbage after it, a truncated GGUF."""
    trunc = tmp_path / "trunc"
    shutil.copytree(model_dir, trunc)
    weights = trunc / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    garbage = tmp_path / "garbage.gguf"
    garbage.write_bytes(b"GGUF\x03\x00\x00\x00" + b"garbage" * 4)  # counts read from text: struct.error
    short = tmp_path / "short.gguf"
    # a real GGUF header (version 3, 0 tensors, 1 key) whose key runs past the end of the file
    short.write_bytes(b"GGUF" + (3).to_bytes(4, "little") + (0).to_bytes(8, "little") + (1).to_bytes(8, "little")
                      + (1000).to_bytes(8, "little") + b"general.arch")
    return {"trunc": trunc, "garbage": garbage, "short": short}


@pytest.mark.parametrize("which", ["trunc", "garbage", "short"])
@pytest.mark.parametrize("command", ["prune", "eval", "error"])
def test_damaged_model_is_one_line(command, which, damaged_models, model_dir, word_text, tmp_path, capsys):
    model = str(damaged_models[which])
    out = tmp_path / "out"
    if command == "prune":
        argv = tiny_args(model, word_text, "--out", str(out))
    elif command == "eval":
        argv = ["eval", "--model", model, "--data", str(word_text), "--eval-seqlen", "16", "--out", str(out)]
    else:
        argv = ["error", "--model", model, "--dense", str(model_dir), "--data", str(word_text),
                "--eval-seqlen", "16", "--device", "cpu", "--out", str(out)]
    assert main(argv) == 2
    one_error_line(capsys, "cannot load model")
    assert not out.exists()
    _no_partial(tmp_path)


# ----------------------------------------------------------------------------- damaged checkpoints


def _interrupt_after(window: int, monkeypatch):
    from prunekit import checkpoint

    original = checkpoint.Checkpointer.save

    def save(self, k, *args, **kwargs):
        original(self, k, *args, **kwargs)
        if k == window:
            raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint.Checkpointer, "save", save)
    return lambda: monkeypatch.setattr(checkpoint.Checkpointer, "save", original)


RECON = ("--method", "sparsegpt", "--recon", "br-gp", "--epochs", "1")


@pytest.mark.parametrize("damage", ["state-random", "state-empty", "block-truncated", "tensors-missing", "calib-garbage"])
def test_damaged_checkpoint_says_start_over(damage, model_dir, word_text, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    restore = _interrupt_after(1, monkeypatch)
    assert main(tiny_args(model_dir, word_text, *RECON, "--out", str(out))) == 130
    restore()
    capsys.readouterr()
    ckpt = tmp_path / ".run.partial" / "checkpoint"
    if damage == "state-random":
        (ckpt / "state.json").write_bytes(os.urandom(300))
    elif damage == "state-empty":
        (ckpt / "state.json").write_text("")
    elif damage == "block-truncated":
        f = next((ckpt / "blocks").iterdir())
        f.write_bytes(f.read_bytes()[:100])
    elif damage == "tensors-missing":
        next(ckpt.glob("tensors.*")).unlink()
    else:
        (ckpt / "calibration.safetensors").write_bytes(b"\x08" + os.urandom(64))
    assert main(["prune", "--resume", str(out)]) == 2
    line = one_error_line(capsys, "damaged")
    assert "--overwrite" in line and "continue" not in line
    assert not out.exists()
    # the way out the message names works
    assert main(tiny_args(model_dir, word_text, *RECON, "--out", str(out), "--overwrite")) == 0
    assert (out / "model.safetensors").is_file()
    _no_partial(tmp_path)


def test_damaged_saved_config_of_an_interrupted_run(model_dir, word_text, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    restore = _interrupt_after(0, monkeypatch)
    assert main(tiny_args(model_dir, word_text, *RECON, "--out", str(out))) == 130
    restore()
    capsys.readouterr()
    (tmp_path / ".run.partial" / "config.yaml").write_text("prune: [oops\n")
    assert main(["prune", "--resume", str(out)]) == 2
    one_error_line(capsys, "--overwrite")


# ----------------------------------------------------------------------------- damaged YAML and metrics


@pytest.mark.parametrize("content", [b"\xff\xfe\x00garbage", b"a: [1, 2\n", b"- 1\n- 2\n", b"nsamples: .nan\n"])
def test_damaged_yaml_is_one_line(content, tmp_path, capsys):
    f = tmp_path / "c.yaml"
    f.write_bytes(content)
    assert main(["prune", "--config", str(f), "--model", "/nonexistent/model", "--out", str(tmp_path / "r")]) == 2
    one_error_line(capsys, str(f))
    nothing_left(tmp_path, {"c.yaml"})


@pytest.mark.parametrize("content", ["{not json", "[1, 2]", '{"perplexity": [1]}', '{"zeroshot": {"tasks": 3}}',
                                     '{"reconstruction": {"units": [{"loss_curve": ["x"]}]}}'])
def test_malformed_metrics_json_in_report(content, tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.json").write_text(content)
    assert main(["report", str(run), "--out", str(tmp_path / "cmp")]) == 2
    one_error_line(capsys, "metrics.json")
    nothing_left(tmp_path, {"run"})


# ----------------------------------------------------------------------------- a full disk


def test_too_little_space_for_checkpoint_and_model_is_refused_before_work(model_dir, word_text, tmp_path, monkeypatch, capsys):
    from prunekit import run as run_module

    model_bytes = sum(p.stat().st_size for p in model_dir.glob("*.safetensors"))
    real = shutil.disk_usage

    def usage(path):  # room for the model alone, not for the model and the checkpoint
        u = real(path)
        return u._replace(free=int(model_bytes * 1.3))

    monkeypatch.setattr(shutil, "disk_usage", usage)
    called = []
    monkeypatch.setattr(run_module, "prune", lambda *a, **k: called.append(1))
    out = tmp_path / "run"
    assert main(tiny_args(model_dir, word_text, "--out", str(out))) == 2
    one_error_line(capsys, "checkpoint")
    assert not called and not out.exists()
    _no_partial(tmp_path)


def test_disk_full_while_checkpointing(model_dir, word_text, tmp_path, monkeypatch, capsys):
    from prunekit import checkpoint

    calls = []
    original = checkpoint.save_file

    def save_file(tensors, filename, metadata=None):
        calls.append(filename)
        if ".w1." in Path(filename).name:  # window 0 is checkpointed; window 1's first file fills the disk
            Path(filename).write_bytes(b"partial")
            raise Exception("Error while serializing: I/O error: No space left on device (os error 28)")
        return original(tensors, filename, metadata=metadata)

    monkeypatch.setattr(checkpoint, "save_file", save_file)
    out = tmp_path / "run"
    assert main(tiny_args(model_dir, word_text, *RECON, "--out", str(out))) == 2
    line = one_error_line(capsys, "no space left")
    assert f"--resume {out}" in line
    assert not out.exists()
    assert not list((tmp_path / ".run.partial").rglob(".*.tmp"))  # the half-written file is gone
    monkeypatch.setattr(checkpoint, "save_file", original)
    assert main(["prune", "--resume", str(out)]) == 0
    assert (out / "model.safetensors").is_file()


def test_disk_full_when_saving_the_model_keeps_the_checkpoint(model_dir, word_text, tmp_path, monkeypatch, capsys):
    from prunekit import run as run_module

    original = run_module.save_model

    def save_model(model, tokenizer, directory):
        (Path(directory) / "model.safetensors").write_bytes(b"half")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(run_module, "save_model", save_model)
    out = tmp_path / "run"
    assert main(tiny_args(model_dir, word_text, *RECON, "--out", str(out))) == 2
    one_error_line(capsys, f"--resume {out}")
    assert not out.exists()
    monkeypatch.setattr(run_module, "save_model", original)
    assert main(["prune", "--resume", str(out)]) == 0
    reference = tmp_path / "whole"
    assert main(tiny_args(model_dir, word_text, *RECON, "--out", str(reference))) == 0
    a, b = load_file(reference / "model.safetensors"), load_file(out / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_checkpoint_is_deleted_when_only_that_makes_room(tmp_path, monkeypatch):
    from prunekit.checkpoint import Checkpointer
    from prunekit.rundir import RunDir
    from prunekit.run import _make_room

    rundir = RunDir(tmp_path / "run", resumable=True)
    ckpt = Checkpointer(rundir.path("checkpoint"), "x")
    ckpt.save(0, 0, {}, {}, {}, {}, streams={"sparse": torch.zeros(1000), "dense": None})
    size = ckpt.size_on_disk()
    monkeypatch.setattr(RunDir, "free_bytes", lambda self: 100)
    _make_room(rundir, ckpt, size)  # fits once the checkpoint is gone
    assert not ckpt.dir.exists()
    with pytest.raises(OSError) as e:
        _make_room(rundir, ckpt, 10**9)
    assert e.value.errno == errno.ENOSPC


# ----------------------------------------------------------------------------- unwritable and over-long outputs


@requires_read_only
def test_read_only_outputs(model_dir, word_text, tmp_path, capsys, monkeypatch):
    from prunekit import selfgen

    assert main(tiny_args(model_dir, word_text, "--out", str(READ_ONLY / "run"))) == 2
    one_error_line(capsys, "cannot write")
    assert main(tiny_args(model_dir, word_text, "--offload", "disk", "--offload-dir", str(READ_ONLY),
                          "--out", str(tmp_path / "run"))) == 2
    one_error_line(capsys, "--offload-dir")
    nothing_left(tmp_path)
    monkeypatch.setattr(selfgen, "self_calibration", lambda *a, **k: pytest.fail("generated before checking --out"))
    assert main(["generate-calib", "--model", str(model_dir), "--device", "cpu", "--out", str(READ_ONLY / "c.jsonl")]) == 2
    one_error_line(capsys, "cannot write")
    run = tmp_path / "r"
    run.mkdir()
    (run / "metrics.json").write_text("{}")
    assert main(["report", str(run), "--out", str(READ_ONLY / "cmp")]) == 2
    one_error_line(capsys, "cannot write")


def test_offload_dir_that_does_not_exist_or_is_a_file(model_dir, word_text, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert main(tiny_args(model_dir, word_text, "--offload-dir", str(blocker), "--out", str(tmp_path / "run"))) == 2
    one_error_line(capsys, "--offload-dir")
    nothing_left(tmp_path, {"file"})


@pytest.mark.parametrize("command", ["prune", "eval", "error", "report", "generate-calib"])
def test_output_name_too_long(command, model_dir, word_text, tmp_path, capsys):
    out = str(tmp_path / ("r" * 250))
    if command == "prune":
        argv = tiny_args(model_dir, word_text, "--out", out)
    elif command == "eval":
        argv = ["eval", "--model", str(model_dir), "--data", str(word_text), "--out", out]
    elif command == "error":
        argv = ["error", "--model", str(model_dir), "--data", str(word_text), "--out", out]
    elif command == "report":
        (tmp_path / "run").mkdir()
        (tmp_path / "run" / "metrics.json").write_text("{}")
        argv = ["report", str(tmp_path / "run"), "--out", out]
    else:
        argv = ["generate-calib", "--model", str(model_dir), "--out", out]
    assert main(argv) == 2
    one_error_line(capsys, "shorter")
    nothing_left(tmp_path, {"run"})


def test_output_path_over_the_system_limit(model_dir, word_text, tmp_path, capsys):
    deep = tmp_path.joinpath(*["d" * 200] * 25) / "run"  # > 4096 bytes
    assert main(tiny_args(model_dir, word_text, "--out", str(deep))) == 2
    one_error_line(capsys, "shorter")
    nothing_left(tmp_path)


def test_output_folder_name_over_the_limit(model_dir, word_text, tmp_path, capsys):
    assert main(tiny_args(model_dir, word_text, "--out", str(tmp_path / ("d" * 300) / "run"))) == 2
    one_error_line(capsys, "shorter")
    nothing_left(tmp_path)


# ----------------------------------------------------------------------------- signals


DRIVER = textwrap.dedent(
    """
    import os, signal, sys
    from pathlib import Path
    from prunekit import checkpoint, cli, run

    point, sig = sys.argv[1], getattr(signal, sys.argv[2])
    hit = lambda: os.kill(os.getpid(), sig)
    # a job started in the background by a non-interactive shell inherits SIGINT ignored, and Python
    # then installs no KeyboardInterrupt handler: the test simulates Ctrl-C at a terminal
    signal.signal(signal.SIGINT, signal.default_int_handler)

    if point == "load":  # the model is loaded, nothing is checkpointed yet
        load = run.load_model
        run.load_model = lambda *a, **k: (load(*a, **k), hit())[0]
    elif point == "window":  # right after window 1's checkpoint
        save = checkpoint.Checkpointer.save
        def patched(self, k, *a, **kw):
            save(self, k, *a, **kw)
            if k == 1:
                hit()
        checkpoint.Checkpointer.save = patched
    elif point == "mid-checkpoint":  # while window 1's files are written: block 1's file is half there
        write = checkpoint.save_file
        def patched(tensors, filename, metadata=None):
            if Path(filename).name in (".1.safetensors.tmp", ".1.w1.safetensors.tmp"):
                Path(filename).write_bytes(b"half")
                hit()
            return write(tensors, filename, metadata=metadata)
        checkpoint.save_file = patched
    elif point == "final-save":  # while the pruned model is written
        save_model = run.save_model
        def patched(model, tokenizer, directory):
            (Path(directory) / "model.safetensors").write_bytes(b"half")
            hit()
            save_model(model, tokenizer, directory)
        run.save_model = patched
    sys.exit(cli.main(sys.argv[3:]))
    """
)


@pytest.fixture(scope="module")
def signal_setup(model_dir, word_text, tmp_path_factory):
    """The driver script and the model an uninterrupted run ends with."""
    root = tmp_path_factory.mktemp("signals")
    driver = root / "driver.py"
    driver.write_text(DRIVER)
    args = tiny_args(model_dir, word_text, *RECON)
    reference = root / "whole"
    assert main(args + ["--out", str(reference)]) == 0
    return driver, args, load_file(reference / "model.safetensors")


def _env() -> dict:
    src = str(Path(__import__("prunekit").__file__).resolve().parents[1])
    return dict(os.environ, PYTHONPATH=os.pathsep.join([src, os.environ.get("PYTHONPATH", "")]), PRUNEKIT_TEST_THREADS="1")


@pytest.mark.parametrize(
    ("point", "sig"),
    [("load", "SIGINT"), ("window", "SIGINT"), ("mid-checkpoint", "SIGKILL"), ("final-save", "SIGKILL")],
)
def test_signal_then_resume_gives_the_same_model(point, sig, signal_setup, tmp_path):
    driver, args, reference = signal_setup
    out = tmp_path / "run"
    res = subprocess.run([sys.executable, str(driver), point, sig, *args, "--out", str(out)],
                         capture_output=True, text=True, env=_env(), timeout=300)
    assert not out.exists()
    if sig == "SIGINT":
        assert res.returncode == 130, res.stderr[-2000:]
        last = res.stderr.strip().splitlines()[-1]
        assert last.startswith("prunekit: interrupted") and "Traceback" not in res.stderr
        if point == "load":  # nothing finished: nothing kept
            assert "nothing was written" in last
            assert list(tmp_path.iterdir()) == []
            return
        assert f"--resume {out}" in last
    else:
        assert res.returncode == -signal.SIGKILL, res.stderr[-2000:]
    res = subprocess.run([sys.executable, "-m", "prunekit", "prune", "--resume", str(out)],
                         capture_output=True, text=True, env=_env(), timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    resumed = load_file(out / "model.safetensors")
    assert resumed.keys() == reference.keys() and all(torch.equal(resumed[k], reference[k]) for k in reference)
    assert [p.name for p in tmp_path.iterdir()] == ["run"]
