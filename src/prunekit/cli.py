"""The ``prunekit`` command.

Flags are generated from the configuration dataclasses, one per leaf field (``nsamples`` ->
``--nsamples``), so the command line, ``--config FILE.yaml`` and the ``config.yaml`` written into
each run directory always agree. Precedence: defaults, then the YAML file, then flags.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

from .config import (
    PRESETS, EvalConfig, ModelConfig, RunConfig, check_device, check_eval_names, leaf_fields, load_yaml, scalar_type,
    set_leaf,
)
from .errors import PrunekitError

log = logging.getLogger("prunekit")

# `prunekit eval --data wikitext2 --tasks boolq --limit 50` reads better than the field names
_ALIASES = {"eval": ["--data"], "eval_tasks": ["--tasks"], "eval_limit": ["--limit"]}
_HELP = {
    "model": "hub id, local model directory, .gguf file, or smollm2-135m (default)",
    "allow_pickle": "read pickle weights (pytorch_model.bin); unpickling can run code: only for files you trust",
    "trust_remote_code": "run the Python code a model ships with: only for a source you trust",
    "method": "magnitude | wanda | sparsegpt",
    "sparsity": "fraction pruned (0.5) or N:M with N kept of every M (2:4)",
    "scope": "comparison group for magnitude/wanda: row | layer | auto",
    "calib": "self | wikitext2 | ptb | c4 | path to .txt/.jsonl",
    "eval": "comma-separated corpora to measure perplexity on (none to skip)",
    "eval_windows": "first K windows; 0 = the whole corpus",
    "data_dir": "folder with the corpora (default: $PRUNEKIT_DATA_DIR)",
    "out": "output directory (written atomically)",
    "recon": "reconstruction preset: " + " | ".join(PRESETS),
    "lr": "AdamW learning rate (default: the preset's, else 2e-4)",
    "recon_batch_size": "calibration windows per gradient step (default: the preset's, else --batch-size)",
    "granularity": "matrix | attn-mlp | block (overrides the preset)",
    "inputs": "sparse | dense: where a unit's inputs come from (overrides the preset)",
    "targets": "local | global: what a unit fits (overrides the preset)",
    "window": "blocks reconstructed together (overrides the preset)",
    "stride": "blocks a window advances by (overrides the preset)",
    "epochs": "passes over the calibration windows per unit (overrides the preset)",
    "holdout": "fraction of calibration windows held out to measure reconstruction error",
    "eval_tasks": "zero-shot tasks: boolq,rte,hellaswag,winogrande,arc_easy,arc_challenge,openbookqa,piqa,lambada, or paper / all",
    "eval_limit": "first N items of each zero-shot task; 0 = all",
    "calib_mix": "fraction of the calibration windows written by the model itself, mixed into --calib",
    "loss": "reconstruction objective: mse | token-mse (each token's error over its norm) | cosine | kd (through the LM head)",
    "loss_skip": "leave the first k positions of each window (attention sinks) out of the loss",
    "eval_walk": "auto | whole | blocks: evaluate with the whole model on the device, or one block at a time "
    "(auto: block by block when the model does not fit in the device's free memory)",
    "precision": "auto | fp32 | tf32 | bf16: forward/backward passes of reconstruction and of the streams "
    "(bf16 = autocast with float32 weights, loss and optimizer state; tf32 only on CUDA); auto = bf16 on a CUDA GPU, else fp32",
    "weights": "auto | memory | stream: load the whole model into RAM, or read each block from a local safetensors "
    "directory when needed and write it to the output when final (auto: stream when the model would not fit in RAM)",
    "offload": "auto | device | ram | disk: where activation streams live: GPU memory, RAM (pinned on a GPU run) or "
    "memory-mapped files; auto = the GPU while the run's streams take at most 40%% of its free memory, else RAM while "
    "they take at most half of the available memory, else disk",
    "max_shard_size": "shard size of a model written while streaming, e.g. 5GB or 500MB",
    "checkpoint_every": "the activation streams are checkpointed when replaying them through the blocks finished since "
    "(what a resume does) would take this many minutes (0: after every window); finished blocks are checkpointed at once",
    "stream_dtype": "float32 | bfloat16: how activation streams are stored (bfloat16 halves their memory and I/O)",
    "retrain_loss": "--recon retrain: lm (next-token loss on the calibration windows) | kd (KL to the dense model through the LM head)",
    "retrain_nsamples": "--recon retrain: train on this many fresh windows (another seed) instead of the calibration's training windows; 0: the calibration's",
    "gradient_checkpointing": "--recon retrain: recompute block activations (and LM-head chunks) in the backward pass to save memory",
    "parallel": "under torchrun: auto | data | block. data splits the calibration windows across ranks; block gives "
    "each rank its own blocks (only for units on dense inputs with local targets, e.g. --recon free-lunch); auto picks block where it can",
    "dp_batches": "data-parallel gradient steps: global (the single-process run's batches: the same result up to the order "
    "of sums) | local (each rank an even share of every step from its own windows: balanced ranks, another shuffle)",
    "dist_timeout": "under torchrun: minutes a rank waits for the others before the job ends with an error",
    "guard": "revert | warn | off: compare reconstruction with the masks-only weights on held-out windows "
    "(per window, and end to end by KL through the LM head); revert windows, or the whole run, that end worse",
}


def _add_dataclass_flags(parser: argparse.ArgumentParser, cfg: Any, only: set[str] | None = None) -> None:
    for name, (_, f) in leaf_fields(cfg).items():
        if only is not None and name not in only:
            continue
        flags = [f"--{name.replace('_', '-')}"] + _ALIASES.get(name, [])
        typ = scalar_type(f)
        default = f.default if f.default is not dataclasses.MISSING else None
        help_text = _HELP.get(name, "")
        if "default:" not in help_text:
            help_text = f"{help_text} (default: {default})".strip()
        if typ is bool:
            parser.add_argument(*flags, dest=name, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=help_text)
        else:
            parser.add_argument(*flags, dest=name, type=typ, default=argparse.SUPPRESS, help=help_text)


_SKIP = ("command", "config", "verbose", "resume")


def _apply(cfg: Any, ns: argparse.Namespace, skip: tuple[str, ...] = _SKIP) -> set[str]:
    """Apply ``--config`` and then the flags to ``cfg``; return the names of the settings given."""
    given: set[str] = set()
    if getattr(ns, "config", None):
        given |= load_yaml(ns.config, cfg)
    for key, value in vars(ns).items():
        if key not in skip:
            set_leaf(cfg, key, value)
            given.add(key)
    return given


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="prunekit", description="Prune large language models after training.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("prune", help="prune a model, evaluate it and save it")
    p.add_argument("--config", help="YAML file with settings (flags override it)")
    p.add_argument("--resume", metavar="DIR", help="continue the interrupted run whose --out was DIR (its settings are reused)")
    _add_dataclass_flags(p, RunConfig())

    e = sub.add_parser("eval", help="perplexity of a (pruned) model")
    e.add_argument("--config", help="YAML file with settings (flags override it)")
    _add_dataclass_flags(e, _EvalRun())

    r = sub.add_parser("error", help="per-block error of pruned models against their dense model (global propagation)")
    r.add_argument("--model", nargs="+", required=True, help="pruned model directories (one line each in the plot)")
    r.add_argument("--dense", default="smollm2-135m", help="the dense model (default: smollm2-135m)")
    r.add_argument("--data", default="wikitext2", help="corpus or .txt/.jsonl file (default: wikitext2)")
    r.add_argument("--eval-seqlen", type=int, default=512)
    r.add_argument("--eval-windows", type=int, default=16, help="first K windows; 0 = all (default: 16)")
    r.add_argument("--eval-batch-size", type=int, default=4)
    r.add_argument("--data-dir", default=None)
    r.add_argument("--device", default="auto")
    r.add_argument("--eval-walk", default="auto", help=_HELP["eval_walk"] + " (default: auto)")
    r.add_argument("--dtype", default="float32")
    r.add_argument("--allow-pickle", action="store_true", help="read pickle weights (pytorch_model.bin): only files you trust")
    r.add_argument("--out", required=True, help="directory for errors.json and block_errors.png")

    c = sub.add_parser("report", help="one Markdown and HTML page comparing run directories")
    c.add_argument("runs", nargs="+", help="run directories written by `prunekit prune`")
    c.add_argument("--out", default="report", help="output directory (default: ./report)")

    g = sub.add_parser("generate-calib", help="let the dense model write calibration text (cached for prune)")
    _add_dataclass_flags(g, RunConfig(), only={"model", "dtype", "device", "nsamples", "seqlen", "seed", "gen_batch_size", "cache_dir"})
    g.add_argument("--out", help="also write the windows as JSON lines of text to this file")
    return parser


@dataclasses.dataclass
class _EvalRun:
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    eval: EvalConfig = dataclasses.field(default_factory=EvalConfig)
    data_dir: str | None = None
    out: str | None = None  # directory for metrics.json


def _cmd_prune(ns: argparse.Namespace) -> int:
    from .run import apply_resume_overrides, resume_config, run_prune

    if ns.resume:
        if ns.config:
            raise PrunekitError("--config cannot be combined with --resume: a resumed run keeps its own settings; drop --config")
        cfg = resume_config(ns.resume)
        # a resumed run may move to another device; a flag that would change the result is refused
        apply_resume_overrides(cfg, {k: v for k, v in vars(ns).items() if k not in _SKIP})
        run_prune(cfg, resume=True)
        return 0
    cfg = RunConfig()
    given = _apply(cfg, ns)
    if not cfg.out:
        raise PrunekitError("no output directory; pass --out DIR (the pruned model, metrics and report go there)")
    run_prune(cfg, eval_fallback="eval" not in given)
    return 0


def _cmd_eval(ns: argparse.Namespace) -> int:
    from .blockwalk import choose_walk
    from .evaluate import effective_seqlen
    from .models import load_model
    from .pipeline import resolve_device
    from .rundir import RunDir
    from .run import EvalSet, evaluate_sets, peak_rss_mb, run_zeroshot
    from .data import eval_text, eval_windows

    cfg = _EvalRun()
    _apply(cfg, ns)
    cfg.model.validate()
    if ns.command == "eval" and "eval" not in vars(ns) and cfg.eval.eval_tasks:
        cfg.eval.eval = "none"  # `prunekit eval --tasks ...` alone: zero-shot only
    cfg.eval.validate()
    check_eval_names(cfg.eval.datasets())
    if not cfg.eval.datasets() and not cfg.eval.eval_tasks:
        raise PrunekitError("nothing to evaluate; pass --data wikitext2 (or ptb, c4, a .txt/.jsonl file) or --tasks boolq,...")
    device = resolve_device(cfg.model.device)
    if cfg.out:
        _refuse_overwriting(cfg.out, [cfg.model.model])
    rundir = RunDir(cfg.out, overwrite=True) if cfg.out else None
    try:
        model, tokenizer = load_model(cfg.model.model, cfg.model.dtype, cfg.model.trust_remote_code, cfg.model.allow_pickle)
        seqlen = effective_seqlen(model, cfg.eval.eval_seqlen)
        sets = [
            EvalSet(name, eval_windows(tokenizer(eval_text(name, cfg.data_dir))["input_ids"], seqlen, cfg.eval.eval_windows))
            for name in cfg.eval.datasets()
        ]
        t = time.perf_counter()
        walk = choose_walk(cfg.eval.eval_walk, [model], device)
        results = evaluate_sets(model, sets, cfg.eval.eval_batch_size, device, walk)
        metrics: dict[str, Any] = {
            "model": cfg.model.model,
            "perplexity": {r.dataset: r.ppl for r in results},
            "perplexity_detail": {r.dataset: {"seqlen": r.seqlen, "windows": r.windows, "seconds": r.seconds} for r in results},
        }
        for r in results:
            print(f"{r.dataset}: perplexity {r.ppl:.3f} ({r.windows} windows of {r.seqlen} tokens)")
        markdown = ""
        if cfg.eval.eval_tasks:
            zs = run_zeroshot(model, tokenizer, cfg.eval, cfg.data_dir, device, walk)
            metrics["zeroshot"] = zs.to_dict()
            markdown = zs.to_markdown()
            print(markdown)
        metrics["timing"] = {"eval_s": time.perf_counter() - t}
        metrics["peak_rss_mb"] = peak_rss_mb()
        if rundir is not None:
            rundir.write_json("metrics.json", metrics)
            if markdown:
                rundir.write_text("zeroshot.md", markdown + "\n")
            rundir.commit()
    except BaseException:
        if rundir is not None:
            rundir.discard()
        raise
    return 0


def _cmd_error(ns: argparse.Namespace) -> int:
    from .blockwalk import WALKS, choose_walk
    from .data import eval_text, eval_windows
    from .evaluate import block_error_detail, effective_seqlen
    from .models import load_model
    from .pipeline import resolve_device
    from .report import plot_block_errors
    from .rundir import RunDir

    if ns.eval_windows < 0 or ns.eval_seqlen < 2:
        raise PrunekitError("eval-windows must be 0 or more and eval-seqlen at least 2")
    if ns.eval_walk not in WALKS:
        raise PrunekitError(f"unknown eval-walk {ns.eval_walk!r}; choose auto, whole or blocks")
    check_device(ns.device)
    check_eval_names([ns.data])
    _require_matplotlib("block_errors.png")
    _refuse_overwriting(ns.out, [*ns.model, ns.dense])
    if ns.allow_pickle:
        load_model = functools.partial(load_model, allow_pickle=True)
    rundir = RunDir(ns.out, overwrite=True)
    try:
        device = resolve_device(ns.device)
        dense, tokenizer = load_model(ns.dense, ns.dtype)
        seqlen = effective_seqlen(dense, ns.eval_seqlen)
        windows = eval_windows(tokenizer(eval_text(ns.data, ns.data_dir))["input_ids"], seqlen, ns.eval_windows)
        runs: dict[str, dict[str, list[float]]] = {}
        walk = ns.eval_walk
        for path in ns.model:
            pruned, _ = load_model(path, ns.dtype)
            walk = choose_walk(walk, [dense, pruned], device)  # chosen once, with the first pair
            runs[Path(path).name or path] = block_error_detail(dense, pruned, windows, ns.eval_batch_size, device, walk)
            del pruned
        result = {
            "dense": ns.dense, "data": ns.data, "seqlen": seqlen, "windows": int(windows.shape[0]),
            "models": ns.model, "errors": runs,
        }
        rundir.write_json("errors.json", result)
        plot_block_errors(runs, rundir.path("block_errors.png"), f"{ns.data}, {windows.shape[0]} x {seqlen} tokens")
        rundir.commit()
    except BaseException:
        rundir.discard()
        raise
    for name, errs in runs.items():
        agg, tok, share = errs["aggregate"], errs["token"], errs["first_token_share"]
        print(
            f"{name}: error at block 0 {agg[0]:.4f}, last block {agg[-1]:.4f}; per-token (after the first) "
            f"{tok[0]:.4f} / {tok[-1]:.4f}; first token holds up to {max(share):.0%} of the squared norm"
        )
    print(f"written to {ns.out}/errors.json and block_errors.png")
    return 0


def _refuse_overwriting(out: str, inputs: list[str]) -> None:
    """``--out`` is replaced as a whole: never let it be a model directory or a run (an input above all)."""
    final = Path(out).expanduser()
    if any(final.resolve() == Path(i).expanduser().resolve() for i in inputs):
        raise PrunekitError(f"--out {out} is the model being measured; it would be replaced: choose another --out")
    if final.is_dir() and any((final / f).exists() for f in ("config.json", "model.safetensors", "config.yaml")):
        raise PrunekitError(f"--out {out} holds a model or a run, which it would replace; choose another --out")


def _require_matplotlib(plot: str) -> None:
    """matplotlib is a dependency; a broken install is reported before the work, not as a missing plot."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise PrunekitError(f"matplotlib is not installed, so {plot} cannot be drawn; install it with `pip install matplotlib`") from None


def _cmd_report(ns: argparse.Namespace) -> int:
    from .report import compare_runs

    out = ns.out
    compare_runs(ns.runs, out)
    print(f"written {out}/report.md and {out}/report.html")
    return 0


def _cmd_generate(ns: argparse.Namespace) -> int:
    from .models import load_model
    from .pipeline import resolve_device
    from .rundir import check_path_length, probe_writable
    from .selfgen import self_calibration

    out = ns.out
    del ns.out
    cfg = RunConfig()
    _apply(cfg, ns)
    cfg.validate()
    c = cfg.prune.calib
    device = resolve_device(cfg.prune.device)
    if out:  # an unwritable --out is reported now, not after the generation
        path = Path(out).expanduser()
        if path.is_dir():
            raise PrunekitError(f"--out {path} is a directory; give a file name such as calib.jsonl")
        check_path_length(path)
        probe_writable(path.parent, "the folder of --out")
    model, tokenizer = load_model(cfg.model.model, cfg.model.dtype, cfg.model.trust_remote_code, cfg.model.allow_pickle)
    ids = self_calibration(model, tokenizer, c.nsamples, c.seqlen, c.seed, c.gen_batch_size, device, c.cache_dir)
    print(f"{ids.shape[0]} windows of {ids.shape[1]} tokens ready (cached; `prunekit prune --calib self` with the same settings reuses them)")
    if out:
        tmp = path.with_name(f".{path.name}.tmp")
        try:
            with tmp.open("w", encoding="utf-8") as fh:
                for row in ids:
                    fh.write(json.dumps({"text": tokenizer.decode(row)}) + "\n")
            tmp.replace(path)
        except BaseException as e:
            tmp.unlink(missing_ok=True)
            if isinstance(e, OSError):
                raise PrunekitError(f"cannot write {path} ({e.strerror}); free some space or choose another --out") from None
            raise
        print(f"texts written to {path}")
    return 0


def _release(e: BaseException) -> None:
    """Drop the frames of a failed command now, so that what they hold (a progress bar that redraws
    itself when closed) is finished before the one line that ends the command."""
    import gc

    e.__traceback__ = None
    e.__context__ = None
    gc.collect()
    sys.stderr.flush()


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    ns = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if ns.verbose else logging.INFO, format="prunekit: %(message)s")
    try:
        import transformers

        transformers.logging.set_verbosity_error()
    except ImportError:  # pragma: no cover
        pass
    handler = {"prune": _cmd_prune, "eval": _cmd_eval, "error": _cmd_error, "report": _cmd_report,
               "generate-calib": _cmd_generate}[ns.command]
    try:
        return handler(ns)
    except PrunekitError as e:
        _release(e)
        message = " ".join(str(e).split("\n"))  # one line, whatever text a library put into it
        print(f"prunekit: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        _release(e)
        resume_dir = getattr(e, "resume_dir", None)
        if resume_dir:
            print(f"prunekit: interrupted; continue with `prunekit prune --resume {resume_dir}`", file=sys.stderr)
        else:
            print("prunekit: interrupted; nothing was written", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
