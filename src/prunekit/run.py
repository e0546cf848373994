"""A whole run, as ``prunekit prune`` does it: load, calibrate and prune, evaluate, save, report.

Evaluation text is loaded and tokenized *before* pruning so that a missing corpus is reported
before minutes of work. When no evaluation corpus can be found, perplexity is measured on held-out
text that the dense model writes itself (seed + 1, so no window repeats the calibration data), and
the report says so.
"""

from __future__ import annotations

import logging
import resource
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

import hashlib
import json

from .checkpoint import Checkpointer
from .config import RunConfig, dump_yaml, load_yaml, to_dict
from .data import eval_text, eval_windows
from .errors import PrunekitError
from .evaluate import Perplexity, effective_seqlen, perplexity_of_ids
from .models import load_model, save_model
from .pipeline import prune, resolve_device
from .report import plot_unit_errors, render_markdown, summary_lines
from .rundir import RunDir
from .selfgen import self_calibration

log = logging.getLogger(__name__)

HELDOUT_WINDOWS = 8  # windows of held-out self-generated text when no corpus is available


@dataclass
class EvalSet:
    name: str
    windows: torch.Tensor  # [n, seqlen]
    note: str | None = None


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def prepare_eval_sets(model: nn.Module, tokenizer, cfg: RunConfig, device: torch.device) -> list[EvalSet]:
    """Tokenize the evaluation corpora now, falling back to held-out self-generated text."""
    ev = cfg.eval
    seqlen = effective_seqlen(model, ev.eval_seqlen)
    sets: list[EvalSet] = []
    missing: list[str] = []
    for name in ev.datasets():
        try:
            ids = tokenizer(eval_text(name, cfg.prune.calib.data_dir))["input_ids"]
        except PrunekitError as e:
            if Path(name).suffix in (".txt", ".jsonl"):
                raise  # a file the user named must exist
            log.warning("%s", e)
            missing.append(name)
            continue
        sets.append(EvalSet(name, eval_windows(ids, seqlen, ev.eval_windows)))
    if missing and not sets:
        calib = cfg.prune.calib
        n = min(ev.eval_windows or HELDOUT_WINDOWS, HELDOUT_WINDOWS)
        gen_len = min(seqlen, calib.seqlen)
        windows = self_calibration(
            model, tokenizer, n, gen_len, calib.seed + 1, calib.gen_batch_size, device, calib.cache_dir
        )
        note = (
            f"no evaluation corpus found ({', '.join(missing)}); perplexity is on {n} held-out self-generated "
            f"windows of {gen_len} tokens (seed {calib.seed + 1}), not comparable with corpus perplexity"
        )
        sets.append(EvalSet("selfgen-heldout", windows, note))
    elif missing:
        log.warning("skipping unavailable evaluation corpora: %s", ", ".join(missing))
    return sets


def run_zeroshot(model: nn.Module, tokenizer, ev, data_dir: str | None, device: torch.device):
    """Zero-shot accuracy on ``ev.eval_tasks`` (see :mod:`prunekit.zeroshot`), or lm-eval's dict."""
    from .zeroshot import evaluate_tasks, parse_tasks

    if ev.backend == "lm-eval":
        from .lmeval_backend import LmEvalResult, evaluate_tasks_lm_eval

        return LmEvalResult(evaluate_tasks_lm_eval(
            model, tokenizer, parse_tasks(ev.eval_tasks), data_dir, ev.eval_limit or None, ev.eval_batch_size, str(device)
        ))
    return evaluate_tasks(
        model, tokenizer, parse_tasks(ev.eval_tasks), data_dir=data_dir, limit=ev.eval_limit or None,
        batch_size=ev.eval_batch_size, device=device,
    )


def evaluate_sets(model: nn.Module, sets: list[EvalSet], batch_size: int, device: torch.device) -> list[Perplexity]:
    return [perplexity_of_ids(model, s.name, s.windows, batch_size, device) for s in sets]


def matmul_gflops(device: torch.device, size: int = 1024, seconds: float = 1.0) -> float:
    """The device's float32 matmul rate, measured now (the yardstick for reconstruction throughput)."""
    a = torch.randn(size, size, device=device)
    b = torch.randn(size, size, device=device)
    a @ b
    n = 0
    t = time.perf_counter()
    while time.perf_counter() - t < seconds:
        a @ b
        n += 1
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return 2 * size**3 * n / (time.perf_counter() - t) / 1e9


def reconstruction_metrics(report, device: torch.device) -> dict[str, Any]:
    """Errors before/after per unit and overall, and the training throughput against the matmul rate."""
    train_s = sum(u.seconds for u in report.units)
    flops = sum(u.flops for u in report.units)
    out: dict[str, Any] = {
        "settings": report.recon,
        "heldout_windows": report.heldout_windows,
        "error": report.error_summary(),
        "guard": report.guard.to_dict() if report.guard is not None else None,
        "units": [asdict(u) for u in report.units],
    }
    if flops:
        achieved = flops / max(train_s, 1e-9) / 1e9
        peak = matmul_gflops(device)
        out["throughput"] = {"train_gflops": achieved, "matmul_gflops": peak, "fraction": achieved / peak}
    return out


def coverage_notes(calib_seqlen: int, results: list[Perplexity]) -> list[str]:
    """Say when perplexity is measured at positions that reconstruction never saw.

    Reconstruction fits the blocks on calibration windows of ``calib_seqlen`` tokens; positions past
    that were never in a loss, and on some models reconstruction helps there least or hurts (issue 10:
    positions 256-511 of a Gemma-3-style model went from perplexity 77 to 559).
    """
    longer = sorted({r.seqlen for r in results if r.seqlen > calib_seqlen})
    if not longer:
        return []
    return [
        f"calibration windows are {calib_seqlen} tokens but perplexity is measured at {', '.join(map(str, longer))}: "
        "positions beyond the calibration length were not reconstructed on; calibrate at the evaluation length to cover them"
    ]


def settings_fingerprint(cfg: RunConfig) -> str:
    """What a checkpoint must agree on to be resumed: everything but output and placement settings."""
    d = to_dict(cfg)
    try:  # the values the run actually uses, so a changed preset does not resume silently
        d["prune"]["recon"] = to_dict(cfg.prune.recon.resolved())
    except PrunekitError:
        pass
    for key in ("out", "overwrite"):
        d.pop(key, None)
    d["model"].pop("device", None)
    for key in ("device", "offload", "offload_dir"):
        d["prune"].pop(key, None)
    d["prune"]["calib"].pop("cache_dir", None)
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


def resume_config(out: str) -> RunConfig:
    """The settings of the interrupted run at ``out`` (from its partial directory's config.yaml)."""
    cfg = RunConfig()
    partial = Path(out).expanduser()
    load_yaml(partial.parent / f".{partial.name}.partial" / "config.yaml", cfg)
    cfg.out = out
    return cfg


def run_prune(cfg: RunConfig, resume: bool = False) -> dict[str, Any]:
    """Run the whole job described by ``cfg`` and return its metrics (also written to ``cfg.out``).

    The run checkpoints after every window into its partial output directory; with ``resume`` it
    continues an interrupted run there (``cfg`` should come from :func:`resume_config`).
    """
    sparsity = cfg.validate()
    t0 = time.perf_counter()
    rundir = RunDir(cfg.out, cfg.overwrite, resume=resume, resumable=True) if cfg.out else None
    checkpoint = None
    if rundir is not None:
        rundir.write_text("config.yaml", dump_yaml(cfg))
        checkpoint = Checkpointer(rundir.path("checkpoint"), settings_fingerprint(cfg))
    try:
        device = resolve_device(cfg.prune.device)
        model, tokenizer = load_model(cfg.model.model, cfg.model.dtype, cfg.model.trust_remote_code)
        load_s = time.perf_counter() - t0
        if rundir is not None:  # now the size is known: fail before the work if it cannot be saved
            size = sum(p.numel() * p.element_size() for p in model.parameters())
            rundir.check_space(int(size * 1.2))
        sets = prepare_eval_sets(model, tokenizer, cfg, device)
        model, report = prune(model, tokenizer, cfg.prune, checkpoint=checkpoint)
        t = time.perf_counter()
        results = evaluate_sets(model, sets, cfg.eval.eval_batch_size, device)
        zeroshot = run_zeroshot(model, tokenizer, cfg.eval, cfg.prune.calib.data_dir, device) if cfg.eval.eval_tasks else None
        eval_s = time.perf_counter() - t
        notes = list(report.notes) + [s.note for s in sets if s.note]
        if report.units:
            notes += coverage_notes(report.seqlen, results)
        settings = {
            "model": cfg.model.model,
            "dtype": cfg.model.dtype,
            "method": report.method,
            "sparsity": report.sparsity,
            "scope": report.scope,
            "calib": report.calib,
            "nsamples": report.nsamples,
            "seqlen": report.seqlen,
            "seed": cfg.prune.calib.seed,
            "device": str(device),
        }
        metrics: dict[str, Any] = {
            "settings": settings,
            "perplexity": {r.dataset: r.ppl for r in results},
            "perplexity_detail": {
                r.dataset: {"seqlen": r.seqlen, "windows": r.windows, "seconds": r.seconds} for r in results
            },
            "sparsity": {
                "target": sparsity.fraction,
                "overall": report.overall,
                "pruned_params": report.pruned_params,
                "per_layer": report.per_layer,
                **({"owl": asdict(report.owl)} if report.owl is not None else {}),
            },
            "timing": {"load_s": load_s, **report.timing, "eval_s": eval_s},
            "notes": notes,
        }
        if zeroshot is not None:
            metrics["zeroshot"] = zeroshot.to_dict()
            metrics["zeroshot_markdown"] = zeroshot.to_markdown()
        if report.units:
            metrics["reconstruction"] = reconstruction_metrics(report, device)
        if rundir is not None:
            t = time.perf_counter()
            save_model(model, tokenizer, rundir.tmp)
            metrics["timing"]["save_s"] = time.perf_counter() - t
        metrics["timing"]["total_s"] = time.perf_counter() - t0
        metrics["peak_rss_mb"] = peak_rss_mb()
        if device.type == "cuda":
            metrics["peak_gpu_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
        if rundir is not None:
            rundir.write_text("config.yaml", dump_yaml(cfg))
            rundir.write_json("metrics.json", metrics)
            if report.units:
                plot_unit_errors(report.units, rundir.path("unit_errors.png"))
                metrics["plots"] = ["unit_errors.png"]
            rundir.write_text("report.md", render_markdown(metrics))
            rundir.commit()
        for line in summary_lines(metrics):
            log.info("%s", line)
        if rundir is not None:
            log.info("saved to %s", rundir.final)
        return metrics
    except BaseException as e:
        if rundir is not None:
            if checkpoint is not None and checkpoint.has_state():  # finished windows are worth keeping
                log.warning("the run stopped (%s); continue it with: prunekit prune --resume %s", type(e).__name__, rundir.final)
            else:
                rundir.discard()
        raise
