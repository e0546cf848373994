"""Issue 11: the defects a hostile new user found, one test (or a few) per item.

Every test here failed on the code before the fix. Command-line behaviour is checked through
``prunekit.cli.main`` in process (exit status, one line on stderr, nothing left behind) on a saved
tiny model (``model_dir`` in conftest), so no test needs the hub or the default model.
"""

from __future__ import annotations

import json
import pickle
import re
import sys
from pathlib import Path

import pytest
import torch

import prunekit
from prunekit.cli import _apply, build_parser, main
from prunekit.config import RunConfig

SRC = Path(prunekit.__file__).resolve().parent


def tiny_args(model_dir, corpus, *extra: str) -> list[str]:
    return [
        "prune", "--model", str(model_dir), "--calib", str(corpus), "--nsamples", "4", "--seqlen", "16",
        "--eval", "none", "--device", "cpu", "--batch-size", "2", *extra,
    ]


def one_error_line(capsys, needle: str | None = None) -> str:
    err = capsys.readouterr().err.strip()
    lines = [line for line in err.splitlines() if line.startswith("prunekit: error:")]
    assert len(lines) == 1 and err.splitlines()[-1] == lines[0], err
    if needle is not None:
        assert needle in lines[0], lines[0]
    return lines[0]


def nothing_left(parent: Path, keep: set[str] = frozenset()) -> None:
    assert sorted(p.name for p in parent.iterdir() if p.name not in keep) == []


# ----------------------------------------------------------------------------- wrong behaviour that exited 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_device_cuda_without_gpu_is_refused(model_dir, word_text, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(tiny_args(model_dir, word_text, "--device", "cuda", "--out", str(out))) == 2
    one_error_line(capsys, "no CUDA GPU")
    nothing_left(tmp_path)


@pytest.mark.parametrize("command", ["prune", "generate-calib"])
def test_unknown_device_is_refused_before_work(command, tmp_path, capsys):
    argv = [command, "--model", "/nonexistent/model", "--device", "tpu9"]
    argv += ["--out", str(tmp_path / "run")] if command == "prune" else []
    assert main(argv) == 2
    one_error_line(capsys, "unknown device 'tpu9'")
    nothing_left(tmp_path)


def test_device_flag_reaches_the_pruning():
    cfg = RunConfig()
    _apply(cfg, build_parser().parse_args(["prune", "--device", "cpu", "--out", "x"]))
    cfg.validate()
    assert cfg.model.device == "cpu" and cfg.prune.device == "cpu"
    cfg = RunConfig()
    cfg.prune.device = "cpu"  # a YAML `prune: {device: cpu}` alone
    cfg.validate()
    assert cfg.model.device == "cpu" and cfg.prune.device == "cpu"


def test_misspelt_eval_corpus_is_an_error_before_any_work(tmp_path, capsys):
    assert main(["prune", "--model", "/nonexistent/model", "--eval", "wikitext3", "--out", str(tmp_path / "r")]) == 2
    one_error_line(capsys, "unknown evaluation corpus 'wikitext3'")
    nothing_left(tmp_path)


def test_named_corpus_not_found_is_an_error_not_a_fallback(model_dir, word_text, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # no hub fallback either
    empty = tmp_path / "data"
    empty.mkdir()
    out = tmp_path / "run"
    argv = tiny_args(model_dir, word_text, "--eval", "wikitext2", "--data-dir", str(empty), "--recon", "lr", "--out", str(out))
    assert main(argv) == 2
    one_error_line(capsys, "wikitext2")
    nothing_left(tmp_path, {"data"})


def _interrupted_run(model_dir, word_text, out: Path, monkeypatch, capsys, *extra: str) -> None:
    """A run stopped (Ctrl-C) after its second window's checkpoint."""
    from prunekit import checkpoint

    original = checkpoint.Checkpointer.save

    def save(self, window, *args, **kwargs):
        original(self, window, *args, **kwargs)
        if window == 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint.Checkpointer, "save", save)
    assert main(tiny_args(model_dir, word_text, "--method", "sparsegpt", "--recon", "br-gp", "--epochs", "1",
                          "--out", str(out), *extra)) == 130
    monkeypatch.setattr(checkpoint.Checkpointer, "save", original)
    err = capsys.readouterr().err
    assert f"prunekit prune --resume {out}" in err.strip().splitlines()[-1]


def test_resume_refuses_flags_that_change_the_result(model_dir, word_text, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    _interrupted_run(model_dir, word_text, out, monkeypatch, capsys)
    assert main(["prune", "--resume", str(out), "--sparsity", "0.7", "--method", "magnitude"]) == 2
    one_error_line(capsys, "differs from the interrupted run's")
    assert main(["prune", "--resume", str(out), "--eval", "wikitext2"]) == 2
    one_error_line(capsys, "--eval")
    assert main(["prune", "--resume", str(out), "--config", str(word_text)]) == 2
    one_error_line(capsys, "--config cannot be combined with --resume")
    # settings that do not change the result, or that repeat the run's own, are accepted
    assert main(["prune", "--resume", str(out), "--device", "cpu", "--sparsity", "0.5", "--offload", "ram"]) == 0
    assert (out / "model.safetensors").is_file()


def test_report_refuses_to_overwrite_a_run(tmp_path, capsys):
    runs = []
    for name in ("a", "b"):
        d = tmp_path / name
        d.mkdir()
        (d / "metrics.json").write_text(json.dumps({"settings": {"method": "wanda"}, "perplexity": {"wikitext2": 9.0}}))
        (d / "report.md").write_text(f"run {name}'s own report")
        runs.append(d)
    assert main(["report", str(runs[0]), str(runs[1]), "--out", str(runs[0])]) == 2
    one_error_line(capsys, "one of the runs")
    assert (runs[0] / "report.md").read_text() == "run a's own report"
    other = tmp_path / "notes"
    other.mkdir()
    (other / "todo.txt").write_text("mine")
    assert main(["report", str(runs[0]), "--out", str(other)]) == 2
    one_error_line(capsys, "not a prunekit comparison")
    assert main(["report", str(runs[0]), str(runs[1]), "--out", str(tmp_path / "cmp")]) == 0
    assert (tmp_path / "cmp" / "report.md").is_file() and not list(tmp_path.glob(".cmp*"))


def test_recon_lr_with_training_is_refused(tmp_path, capsys):
    assert main(["prune", "--model", "/nonexistent/model", "--recon", "lr", "--epochs", "2", "--out", str(tmp_path / "r")]) == 2
    one_error_line(capsys, "--recon lr means no reconstruction")
    nothing_left(tmp_path)


def test_overridden_preset_is_relabelled_from_the_resolved_settings():
    from prunekit.config import ReconConfig, recon_label
    from prunekit.report import comparison_rows

    resolved = lambda **kw: vars(ReconConfig(**kw).validate())  # noqa: E731
    assert recon_label(resolved(recon="br-gp")) == "br-gp"
    assert recon_label(resolved(recon="br", epochs=3, targets="global")) == "br (targets global, epochs 3)"
    assert recon_label(resolved(recon="quick", lr=2e-4)) == "quick (lr 0.0002)"
    run = {"_name": "x", "reconstruction": {"settings": resolved(recon="br", epochs=2)}}
    assert "br (epochs 2)" in comparison_rows([run])[1][0]


def test_error_command_without_matplotlib_says_so_before_work(model_dir, tmp_path, capsys, monkeypatch, word_text):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if matplotlib were not installed
    out = tmp_path / "err"
    argv = ["error", "--model", str(model_dir), "--dense", str(model_dir), "--data", str(word_text),
            "--eval-seqlen", "16", "--eval-windows", "2", "--device", "cpu", "--out", str(out)]
    assert main(argv) == 2
    one_error_line(capsys, "matplotlib is not installed, so block_errors.png cannot be drawn")
    nothing_left(tmp_path)


def test_run_without_matplotlib_notes_the_missing_plot(model_dir, word_text, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    out = tmp_path / "run"
    assert main(tiny_args(model_dir, word_text, "--recon", "br", "--epochs", "1", "--out", str(out))) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert "plots" not in metrics and any("unit_errors.png was not drawn" in n for n in metrics["notes"])
    assert "unit_errors.png was not drawn" in (out / "report.md").read_text()
    assert "![unit_errors.png]" not in (out / "report.md").read_text()


def test_matplotlib_is_a_normal_dependency():
    text = (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text()
    deps = text.split("dependencies = [", 1)[1].split("]", 1)[0]
    assert '"matplotlib"' in deps


# ----------------------------------------------------------------------------- security


class _Payload:
    marker = ""

    def __reduce__(self):
        return (Path.write_text, (Path(self.marker), "pwned"))


def test_checkpoint_is_never_unpickled(tmp_path):
    from prunekit.checkpoint import CheckpointDamaged, Checkpointer

    marker = tmp_path / "pwned"
    _Payload.marker = str(marker)
    ckpt = tmp_path / "ckpt"
    Checkpointer(ckpt, "x")
    for name in ("state.pt", "state.json", "calibration.safetensors"):
        (ckpt / name).write_bytes(pickle.dumps(_Payload()))
    with pytest.raises(CheckpointDamaged, match="damaged"):
        Checkpointer(ckpt, "x").load()
    with pytest.raises(CheckpointDamaged):
        Checkpointer(ckpt, "x").calibration()
    assert not marker.exists()


def test_checkpoint_holds_no_pickle(tmp_path):
    from prunekit.checkpoint import Checkpointer

    ckpt = Checkpointer(tmp_path, "x")
    block = torch.nn.Linear(4, 4)
    ckpt.save_calibration(torch.zeros(2, 3, dtype=torch.long))
    ckpt.save(0, 1, {0: block}, {1: block}, {1: {"layers.1.q": torch.ones(4, 4, dtype=torch.bool)}},
              {"per_layer": {"a": 0.5}, "notes": [], "units": [], "recon_s": 0.0},
              streams={"sparse": torch.ones(2, 3, 4), "dense": None})
    files = sorted(p.name for p in tmp_path.rglob("*") if p.is_file())
    assert files == ["0.safetensors", "1.w0.safetensors", "calibration.safetensors", "state.json", "streams.w0.safetensors",
                     "tensors.w0.safetensors"]
    state = Checkpointer(tmp_path, "x").load()
    assert state["masks"][1]["layers.1.q"].dtype == torch.bool and state["streams"]["dense"] is None
    assert state["streams"]["pos"] == 1 and torch.equal(state["streams"]["sparse"], torch.ones(2, 3, 4))
    assert torch.equal(Checkpointer(tmp_path, "x").calibration(), torch.zeros(2, 3, dtype=torch.long))


def test_no_torch_load_without_weights_only():
    for path in SRC.rglob("*.py"):
        for call in re.findall(r"torch\.load\([^)]*\)", path.read_text()):
            assert "weights_only=True" in call, f"{path.name}: {call}"


def test_pickle_weights_are_refused_unless_allowed(tmp_path, capsys, word_text):
    from conftest import save_tiny_model_dir

    src = save_tiny_model_dir(tmp_path / "bin", safe=False)
    assert (src / "pytorch_model.bin").is_file() and not list(src.glob("*.safetensors"))
    out = tmp_path / "run"
    assert main(tiny_args(src, word_text, "--out", str(out))) == 2
    one_error_line(capsys, "--allow-pickle")
    assert not out.exists() and not list(tmp_path.glob(".run*"))
    model, _ = prunekit.load_model(str(src), allow_pickle=True)
    assert model.config.model_type == "llama"


def test_remote_code_model_names_the_flag_and_the_risk(model_dir, tmp_path, capsys):
    import shutil

    src = tmp_path / "remote"
    shutil.copytree(model_dir, src)
    cfg = json.loads((src / "config.json").read_text())
    cfg["model_type"] = "my-own-arch"
    cfg["auto_map"] = {"AutoConfig": "configuration.MyConfig", "AutoModelForCausalLM": "modeling.MyModel"}
    (src / "config.json").write_text(json.dumps(cfg))
    assert main(["eval", "--model", str(src), "--data", "wikitext2"]) == 2
    line = one_error_line(capsys, "--trust-remote-code")
    assert "trust" in line.split("--trust-remote-code", 1)[1]


# ----------------------------------------------------------------------------- YAML and messages


@pytest.mark.parametrize(
    ("yaml_text", "needle"),
    [
        ("nsamples: 4.7\n", "nsamples needs a whole number, not 4.7"),
        ("nsamples: null\n", "nsamples needs a whole number, not null"),
        ("nsamples: [4]\n", "nsamples needs a whole number, not [4]"),
        ("lr: [1]\n", "lr needs a number"),
        ("early_stop: 3\n", "early_stop needs true or false"),
        ("method: {a: 1}\n", "method needs a text value"),
        ("prune: 3\n", "section 'prune' must be a mapping"),
    ],
)
def test_yaml_values_of_the_wrong_type_are_refused_at_load(yaml_text, needle, tmp_path, capsys):
    f = tmp_path / "c.yaml"
    f.write_text(yaml_text)
    # a model that does not exist: the YAML error must come first, before any loading
    assert main(["prune", "--config", str(f), "--model", "/nonexistent/model", "--out", str(tmp_path / "r")]) == 2
    one_error_line(capsys, needle)
    nothing_left(tmp_path, {"c.yaml"})


def test_yaml_values_that_are_fine():
    from prunekit.config import apply_mapping

    cfg = RunConfig()
    apply_mapping(cfg, {"nsamples": 8.0, "lr": "1e-3", "data_dir": None, "sparsity": 0.5, "early_stop": "true"})
    assert cfg.prune.calib.nsamples == 8 and isinstance(cfg.prune.calib.nsamples, int)
    assert cfg.prune.recon.lr == 1e-3 and cfg.prune.calib.data_dir is None
    assert cfg.prune.sparsity.sparsity == "0.5" and cfg.prune.recon.early_stop is True


def test_missing_relative_model_path_is_reported_at_once(tmp_path, monkeypatch, capsys):
    import time

    (tmp_path / "runs").mkdir()
    monkeypatch.chdir(tmp_path)
    t = time.perf_counter()
    assert main(["eval", "--model", "runs/x", "--data", "wikitext2"]) == 2
    assert time.perf_counter() - t < 5  # no hub retries
    one_error_line(capsys, "model directory runs/x does not exist")


def test_resume_of_nothing_or_of_a_finished_run(tmp_path, capsys):
    assert main(["prune", "--resume", str(tmp_path / "never")]) == 2
    line = one_error_line(capsys, f"no interrupted run at {tmp_path / 'never'}")
    assert "--config" not in line and "yaml" not in line
    done = tmp_path / "done"
    done.mkdir()
    (done / "metrics.json").write_text("{}")
    assert main(["prune", "--resume", str(done)]) == 2
    line = one_error_line(capsys, "is finished, nothing to resume")
    assert "--config" not in line


def test_no_data_directory_is_said_plainly(caplog, monkeypatch):
    from prunekit import data

    monkeypatch.delenv(data.DATA_ENV, raising=False)
    monkeypatch.setitem(sys.modules, "datasets", None)
    with caplog.at_level("INFO", logger="prunekit.data"), pytest.raises(prunekit.PrunekitError) as e:
        data.documents("wikitext2", None)
    assert "None" not in caplog.text and "no data directory is set" in caplog.text
    assert "None" not in str(e.value) and "--data-dir" in str(e.value)


def test_eval_and_error_never_replace_a_model_or_run(model_dir, word_text, tmp_path, capsys):
    import shutil

    src = tmp_path / "model"
    shutil.copytree(model_dir, src)
    before = sorted(p.name for p in src.iterdir())
    assert main(["eval", "--model", str(src), "--data", str(word_text), "--out", str(src)]) == 2
    one_error_line(capsys, "would be replaced")
    assert main(["error", "--model", str(src), "--dense", str(model_dir), "--data", str(word_text), "--out", str(src)]) == 2
    one_error_line(capsys, "would be replaced")
    assert sorted(p.name for p in src.iterdir()) == before


def test_yaml_on_off_for_a_text_setting_says_to_quote(tmp_path, capsys):
    f = tmp_path / "c.yaml"
    f.write_text("offload: off\n")
    assert main(["prune", "--config", str(f), "--out", str(tmp_path / "r")]) == 2
    one_error_line(capsys, "quote it")
