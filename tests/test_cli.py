"""Bad input on the command line: one line naming the problem and the fix, non-zero exit, nothing written."""

from __future__ import annotations

import pytest

from prunekit.cli import main


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["prune", "--method", "obs"], "unknown method 'obs'"),
        (["prune", "--sparsity", "1.0"], "outside [0, 1)"),
        (["prune", "--sparsity", "4:2"], "0 < N < M"),
        (["prune", "--sparsity", "half"], "neither a fraction nor N:M"),
        (["prune", "--model", "/nonexistent/model-dir"], "does not exist"),
        (["prune", "--model", "/nonexistent/model.gguf"], "does not exist"),
        (["prune", "--nsamples", "0"], "at least 1"),
        (["prune", "--dtype", "int3"], "unknown dtype"),
        (["prune", "--eval-windows", "-1"], "eval-windows"),
        (["prune", "--precision", "fp16"], "unknown precision 'fp16'; choose one of auto, fp32, tf32, bf16"),
        (["prune", "--stream-dtype", "float16"], "unknown stream-dtype 'float16'"),
    ],
)
def test_bad_input_gives_one_clear_line(argv, needle, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(argv + ["--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("prunekit: error:")
    assert needle in err
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []  # no temporary directory left behind


def test_missing_out_is_an_error(capsys):
    assert main(["prune"]) == 2
    assert "--out" in capsys.readouterr().err


def test_existing_output_is_not_overwritten_without_flag(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    assert main(["prune", "--out", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "x"


def test_unwritable_output_fails_before_work(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    assert main(["prune", "--out", str(blocker / "run")]) == 2
    assert "cannot write" in capsys.readouterr().err


def test_config_file_is_read_and_flags_override(tmp_path):
    from prunekit.cli import _apply, build_parser
    from prunekit.config import RunConfig

    f = tmp_path / "c.yaml"
    f.write_text("prune:\n  sparsity:\n    method: sparsegpt\n  calib:\n    nsamples: 7\nseqlen: 99\n")
    ns = build_parser().parse_args(["prune", "--config", str(f), "--nsamples", "3", "--out", "x"])
    cfg = RunConfig()
    _apply(cfg, ns)
    assert cfg.prune.sparsity.method == "sparsegpt"
    assert cfg.prune.calib.nsamples == 3  # the flag wins over the file
    assert cfg.prune.calib.seqlen == 99  # flat keys work too


def test_unknown_key_in_config_file(tmp_path, capsys):
    f = tmp_path / "c.yaml"
    f.write_text("nsample: 3\n")
    assert main(["prune", "--config", str(f), "--out", str(tmp_path / "r")]) == 2
    assert "unknown setting 'nsample'" in capsys.readouterr().err
