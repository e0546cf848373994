"""A whole run, as ``prunekit prune`` does it: load, calibrate and prune, evaluate, save, report.

Evaluation text is loaded and tokenized *before* pruning so that a missing corpus is reported
before minutes of work. When no evaluation corpus can be found, perplexity is measured on held-out
text that the dense model writes itself (seed + 1, so no window repeats the calibration data), and
the report says so.
"""

from __future__ import annotations

import copy
import dataclasses
import errno
import logging
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

import hashlib
import json

from . import dist, precision
from .blockstore import ShardWeights, StreamedBlocks
from .blockwalk import WeightSource, choose_walk
from .checkpoint import CheckpointDamaged, Checkpointer
from .config import RunConfig, dump_yaml, get_leaf, load_yaml, set_leaf, to_dict
from .data import eval_text, eval_windows
from .errors import PrunekitError
from .evaluate import Perplexity, effective_seqlen, perplexity_of_ids
from .models import _DTYPES, load_model, load_tokenizer, save_model, streamed_source
from .pipeline import prune, resolve_device
from .report import plot_unit_errors, render_markdown, summary_lines
from .rundir import RunDir, probe_writable
from .selfgen import self_calibration
from .shards import ShardWriter, StreamedModel
from .streams import peak_rss_mb

log = logging.getLogger(__name__)

HELDOUT_WINDOWS = 8  # windows of held-out self-generated text when no corpus is available


@dataclass
class EvalSet:
    name: str
    windows: torch.Tensor  # [n, seqlen]
    note: str | None = None


def prepare_eval_sets(
    model: nn.Module, tokenizer, cfg: RunConfig, device: torch.device, fallback: bool = True
) -> list[EvalSet]:
    """Tokenize the evaluation corpora now, falling back to held-out self-generated text.

    The fallback is for the default corpus only (``fallback``): a corpus the user named and that
    cannot be found is an error, raised here, before the pruning.
    """
    ev = cfg.eval
    seqlen = effective_seqlen(model, ev.eval_seqlen)
    sets: list[EvalSet] = []
    missing: list[str] = []
    for name in ev.datasets():
        try:
            ids = tokenizer(eval_text(name, cfg.prune.calib.data_dir))["input_ids"]
        except PrunekitError as e:
            if Path(name).suffix in (".txt", ".jsonl") or not fallback:
                raise  # a corpus or file the user named must exist
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


def run_zeroshot(
    model: nn.Module, tokenizer, ev, data_dir: str | None, device: torch.device, walk: str | None = None,
    source: WeightSource | None = None,
):
    """Zero-shot accuracy on ``ev.eval_tasks`` (see :mod:`prunekit.zeroshot`), or lm-eval's dict.

    ``walk`` (default ``ev.eval_walk``) is the whole model on the device or a block-by-block walk
    (:func:`prunekit.blockwalk.choose_walk`); lm-eval always runs the whole model.
    """
    from .zeroshot import evaluate_tasks, parse_tasks

    walk = walk or ev.eval_walk
    if ev.backend == "lm-eval":
        from .lmeval_backend import LmEvalResult, evaluate_tasks_lm_eval

        if choose_walk(walk, [model], device) == "blocks":
            log.warning("the lm-eval backend runs the whole model on %s, which may not hold it; --backend prunekit walks it block by block", device)
        return LmEvalResult(evaluate_tasks_lm_eval(
            model, tokenizer, parse_tasks(ev.eval_tasks), data_dir, ev.eval_limit or None, ev.eval_batch_size, str(device)
        ))
    return evaluate_tasks(
        model, tokenizer, parse_tasks(ev.eval_tasks), data_dir=data_dir, limit=ev.eval_limit or None,
        batch_size=ev.eval_batch_size, device=device, walk=walk, source=source,
    )


def evaluate_sets(
    model: nn.Module, sets: list[EvalSet], batch_size: int, device: torch.device, walk: str = "auto",
    source: WeightSource | None = None,
) -> list[Perplexity]:
    """Perplexity on each set; ``walk`` is chosen once for all of them (:func:`prunekit.blockwalk.choose_walk`);
    with a ``source`` (weights read from shards) the model is walked block by block."""
    walk = choose_walk(walk, [model], device) if sets else walk
    return [perplexity_of_ids(model, s.name, s.windows, batch_size, device, walk, source) for s in sets]


def matmul_gflops(device: torch.device, size: int = 1024, seconds: float = 1.0, mode: str = "fp32") -> float:
    """The device's matmul rate in ``mode`` (fp32, tf32 or bf16, as :mod:`prunekit.precision` runs
    it), measured now: the yardstick for reconstruction throughput in that precision."""
    a = torch.randn(size, size, device=device)
    b = torch.randn(size, size, device=device)
    with precision.use(mode), precision.forward(device):
        a @ b
        if device.type == "cuda":  # the warm-up must be done before the clock starts
            torch.cuda.synchronize(device)
        n = 0
        t = time.perf_counter()
        while time.perf_counter() - t < seconds:
            a @ b
            n += 1
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return 2 * size**3 * n / (time.perf_counter() - t) / 1e9


def reconstruction_metrics(report, device: torch.device, mode: str = "fp32") -> dict[str, Any]:
    """Errors before/after per unit and overall, and the training throughput against the matmul rate
    in the precision the run trained in (``mode``)."""
    train_s = sum(u.seconds for u in report.units)
    flops = sum(u.flops for u in report.units)
    out: dict[str, Any] = {
        "settings": report.recon,
        "heldout_windows": report.heldout_windows,
        "error": report.error_summary(),
        "guard": report.guard.to_dict() if report.guard is not None else None,
        "units": [asdict(u) for u in report.units],
        # the totals that a retraining run reports too (metrics["retrain"]["compute"]), to set side by side
        "compute": {"flops": flops, "train_s": train_s, "steps": sum(u.steps for u in report.units)},
    }
    if flops:
        achieved = flops / max(train_s, 1e-9) / 1e9
        peak = matmul_gflops(device, mode=mode)
        out["throughput"] = {"train_gflops": achieved, "matmul_gflops": peak, "fraction": achieved / peak,
                             "matmul_precision": mode}
    return out


def retrain_metrics(report, device: torch.device, mode: str = "fp32") -> dict[str, Any]:
    """End-to-end retraining (``--recon retrain``): settings, loss curves, verdicts, and its compute and
    memory under the same names as :func:`reconstruction_metrics`' ``compute`` and ``throughput``."""
    r = report.retrain
    out: dict[str, Any] = {
        "settings": report.recon,
        "heldout_windows": report.heldout_windows,
        **{k: v for k, v in r.to_dict().items() if k != "guard"},
        "guard": r.guard.to_dict() if r.guard is not None else None,
        "compute": {
            "flops": r.flops, "train_s": r.seconds, "steps": r.steps, "tokens": r.tokens,
            "teacher_flops": r.teacher_flops, "teacher_s": r.teacher_seconds,
            "peak_rss_mb": r.peak_rss_mb, "peak_gpu_mb": r.peak_gpu_mb, "optimizer_state_mb": r.optimizer_state_mb,
        },
    }
    if r.flops:
        achieved = r.flops / max(r.seconds, 1e-9) / 1e9
        peak = matmul_gflops(device, mode=mode)
        out["throughput"] = {"train_gflops": achieved, "matmul_gflops": peak, "fraction": achieved / peak,
                             "matmul_precision": mode}
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


def settings_fingerprint(cfg: RunConfig, mode: str | None = None) -> str:
    """What a checkpoint must agree on to be resumed: everything but output and placement settings.

    The precision enters as the mode that runs (``mode``, default: ``--precision`` resolved on the
    run's device), not as written: ``auto`` on a GPU (bf16) and ``auto`` on a CPU (fp32) give
    different models, so a run may not switch between them half-way, while ``auto`` and ``fp32`` on
    a CPU are the same run. ``stream_dtype`` enters as written (bfloat16 streams change the result).
    """
    d = to_dict(cfg)
    try:  # the values the run actually uses, so a changed preset does not resume silently
        d["prune"]["recon"] = to_dict(cfg.prune.recon.resolved())
    except PrunekitError:
        pass
    d["prune"]["precision"] = mode or precision.resolve(cfg.prune.precision, cfg.prune.device)
    for key in ("out", "overwrite"):
        d.pop(key, None)
    d["model"].pop("device", None)
    d["model"].pop("allow_pickle", None)
    d["model"].pop("weights", None)  # where weights live, never what they become
    d["model"].pop("max_shard_size", None)
    for key in ("device", "offload", "offload_dir", "checkpoint_every", "dist_timeout"):
        d["prune"].pop(key, None)
    d["prune"]["calib"].pop("cache_dir", None)
    d["eval"].pop("eval_walk", None)
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


# Settings a resumed run may change: they move the work or its scratch files, never the result.
# Everything else (evaluation settings included: they do not change the pruned model, but they do
# change metrics.json, and a resumed run must end as the uninterrupted one would) is refused.
RESUME_FREE = ("device", "offload", "offload_dir", "cache_dir", "allow_pickle", "checkpoint_every", "eval_walk",
               "weights", "max_shard_size", "dist_timeout")


def resume_config(out: str) -> RunConfig:
    """The settings of the interrupted run at ``out`` (from its partial directory's config.yaml)."""
    cfg = RunConfig()
    final = Path(out).expanduser()
    partial = final.parent / f".{final.name}.partial"
    saved = partial / "config.yaml"
    if not saved.is_file():
        if (final / "metrics.json").is_file():
            raise PrunekitError(f"the run at {final} is finished, nothing to resume; start a new run with another --out or --overwrite")
        raise PrunekitError(f"no interrupted run at {final}; start it without --resume")
    try:
        load_yaml(saved, cfg)
    except PrunekitError as e:
        raise PrunekitError(
            f"the interrupted run at {final} is damaged ({e}); start it over with --overwrite"
        ) from None
    cfg.out = out
    return cfg


def apply_resume_overrides(cfg: RunConfig, given: dict[str, Any]) -> None:
    """Apply settings given with ``--resume``: those in :data:`RESUME_FREE`, and others only when equal.

    A flag that would change the result (``--sparsity 0.7``) is refused rather than ignored.
    """
    for name, value in given.items():
        if name == "out":
            if Path(value).expanduser().absolute() != Path(cfg.out).expanduser().absolute():
                raise PrunekitError(f"--out {value} differs from --resume {cfg.out}; a resumed run finishes where it started")
            continue
        if name in RESUME_FREE:
            set_leaf(cfg, name, value)
            if name == "device":
                cfg.prune.device = cfg.model.device
            continue
        probe = copy.deepcopy(cfg)
        set_leaf(probe, name, value)
        if get_leaf(probe, name) != get_leaf(cfg, name):
            flag = "--" + name.replace("_", "-")
            raise PrunekitError(
                f"{flag} {value} differs from the interrupted run's {get_leaf(cfg, name)}; a resumed run keeps its "
                f"settings (only --{', --'.join(n.replace('_', '-') for n in RESUME_FREE)} may change): drop {flag}, "
                "or start afresh with --overwrite"
            )


def checkpoint_bytes(model: nn.Module, cfg: RunConfig, model_bytes: int) -> int:
    """A generous estimate of the checkpoint's peak size: every block's weights twice (final and, for
    the reconstruction guard, masks-only), two activation streams twice over (the next state is
    written before the previous one is removed), masks and the calibration windows."""
    hidden = getattr(model.config, "hidden_size", None) or getattr(model.config, "n_embd", None) or 0
    element = min(next(model.parameters()).element_size(), precision.stream_dtype(cfg.prune.stream_dtype).itemsize)
    c = cfg.prune.calib
    stream = c.nsamples * c.seqlen * int(hidden) * element
    return int(model_bytes * 2.2) + 4 * stream + c.nsamples * c.seqlen * 8


def _verify_resumable(checkpoint: Checkpointer, cfg: RunConfig, mode: str, device: torch.device) -> None:
    """:meth:`Checkpointer.verify`, saying why when ``--precision auto`` means another mode on this device."""
    try:
        checkpoint.verify()
    except CheckpointDamaged:
        raise
    except PrunekitError:
        if cfg.prune.precision == "auto":
            for other in ("fp32", "bf16"):
                if other != mode and _made_with(checkpoint, settings_fingerprint(cfg, other)):
                    raise PrunekitError(
                        f"the interrupted run trained in {other} (--precision auto on its device), but auto means {mode} "
                        f"on {device}; resume it on the same kind of device (--device), or start afresh with --overwrite"
                    ) from None
        raise


def _made_with(checkpoint: Checkpointer, fingerprint: str) -> bool:
    try:
        return Checkpointer(checkpoint.dir, fingerprint, checkpoint.world).load() is not None
    except PrunekitError:
        return False


def _disk_error(e: OSError, rundir: RunDir | None, resumable: bool) -> PrunekitError:
    """An OSError during the run (a full disk above all), as one line that says where and what next."""
    where = str(rundir.final.parent) if rundir is not None else "the output directory"
    space = e.errno in (errno.ENOSPC, errno.EDQUOT)
    if space:
        problem, fix = f"no space left on the disk of {where}", "free some space"
    elif e.errno == errno.EROFS:
        problem, fix = f"{where} is on a read-only file system", "make it writable"
    else:
        problem, fix = f"{e.strerror or e}" + (f": {e.filename}" if getattr(e, "filename", None) else ""), "fix that"
    if resumable and rundir is not None:
        return PrunekitError(f"{problem}; the finished windows are kept: {fix}, then continue with `prunekit prune --resume {rundir.final}`")
    return PrunekitError(f"{problem}; {fix}{' (or choose another --out)' if space else ''} and run again")


def run_prune(cfg: RunConfig, resume: bool = False, eval_fallback: bool = True) -> dict[str, Any]:
    """Run the whole job described by ``cfg`` and return its metrics (also written to ``cfg.out``).

    The run checkpoints after every window into its partial output directory; with ``resume`` it
    continues an interrupted run there (``cfg`` should come from :func:`resume_config`). With
    ``eval_fallback`` false, an evaluation corpus that cannot be found is an error instead of a
    fallback to self-generated text (the CLI passes false when ``--eval`` was given).

    Failures end as one :class:`PrunekitError` line: a full disk, a damaged checkpoint; an
    interruption (``KeyboardInterrupt``) carries ``resume_dir`` when finished windows were kept.
    """
    sparsity = cfg.validate()
    ranks = dist.init(dist.from_env(), cfg.prune.dist_timeout)  # several processes under torchrun (prunekit.dist)
    # each rank's own GPU under torchrun: kept out of cfg, whose config.yaml a resume reads on every rank
    prune_cfg = dataclasses.replace(cfg.prune, device=dist.device_for(ranks, cfg.prune.device))
    device = resolve_device(prune_cfg.device)  # an unavailable device is refused before any work
    mode = precision.resolve(cfg.prune.precision, device)  # what --precision means here (auto resolved)
    if ranks.active:
        ranks.check_same(settings_fingerprint(cfg, mode) + repr((cfg.out, resume)), "the settings")
        # one decision for every rank: stream when this machine's ranks could not each hold the model
        local = int(os.environ.get("LOCAL_WORLD_SIZE", ranks.world))
        stream_dir = ranks.broadcast_object(
            streamed_source(cfg.model.model, cfg.model.weights, cfg.model.dtype, local) if ranks.main else None)
    else:
        stream_dir = streamed_source(cfg.model.model, cfg.model.weights, cfg.model.dtype)
    if stream_dir is not None and not cfg.out:
        raise PrunekitError("a model streamed from disk is written block by block as it is pruned: give --out")
    if not ranks.main:
        return _follow(cfg, prune_cfg, resume, ranks, mode, stream_dir)
    if cfg.prune.offload_dir:
        probe_writable(Path(cfg.prune.offload_dir).expanduser(), "--offload-dir")
    t0 = time.perf_counter()
    rundir = RunDir(cfg.out, cfg.overwrite, resume=resume, resumable=True) if cfg.out else None
    checkpoint = None
    try:
        if rundir is not None:
            rundir.write_text("config.yaml", dump_yaml(cfg))
            checkpoint = Checkpointer(rundir.path("checkpoint"), settings_fingerprint(cfg, mode), ranks.world)
            if resume:
                _verify_resumable(checkpoint, cfg, mode, device)  # a damaged checkpoint is reported now, not after loading the model
    except OSError as e:
        if rundir is not None and not resume:
            rundir.discard()
        raise _disk_error(e, rundir, resume) from None
    store = writer = None
    try:
        if stream_dir is not None:  # a skeleton on the meta device; blocks are read when needed
            sm = StreamedModel(stream_dir, _DTYPES[cfg.model.dtype], trust_remote_code=cfg.model.trust_remote_code)
            model, tokenizer = sm.model, load_tokenizer(stream_dir, cfg.model.trust_remote_code)
            # finished blocks go straight to the output shards, which are also the checkpoint of them
            writer = ShardWriter(rundir.tmp, cfg.model.max_shard_size, in_place=True, resume=resume)
            # masks-only weights of finished blocks for the guard's end-to-end check, beside the checkpoint
            store = StreamedBlocks(sm, writer, lr_dir=rundir.path("checkpoint") / "lr", resume=resume)
            log.info("weights are streamed from %s, one window of blocks at a time", stream_dir)
        else:
            model, tokenizer = load_model(cfg.model.model, cfg.model.dtype, cfg.model.trust_remote_code, cfg.model.allow_pickle)
        load_s = time.perf_counter() - t0
        model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        if rundir is not None:  # now the size is known: fail before the work if it cannot be saved
            have = checkpoint.size_on_disk() if checkpoint is not None else 0
            need = 0 if checkpoint is None else max(checkpoint_bytes(model, cfg, model_bytes) - have, 0)
            rundir.check_space(int(model_bytes * 1.2) + need, "the run (its checkpoint and the saved model)")
        # text generated by the model itself needs all of it in memory: not when streaming
        sets = prepare_eval_sets(model, tokenizer, cfg, device, fallback=eval_fallback and store is None)
        with dist.failures(ranks):
            model, report = prune(model, tokenizer, prune_cfg, checkpoint=checkpoint, store=store, ranks=ranks)
            dist.shutdown(ranks)  # the other ranks are done; evaluation and saving are rank 0's
        source = None
        if writer is not None:  # the pruned model is complete on disk: evaluate it from there
            t = time.perf_counter()
            model.config.use_cache = True
            writer.finish(config=model.config, copy_from=stream_dir, expected=sm.saved_names())
            report.timing["save_s"] = time.perf_counter() - t
            pruned = StreamedModel(rundir.tmp, _DTYPES[cfg.model.dtype], trust_remote_code=cfg.model.trust_remote_code)
            model, source = pruned.model, ShardWeights(pruned, device)
        t = time.perf_counter()
        walk = choose_walk(cfg.eval.eval_walk, [model], device) if sets or cfg.eval.eval_tasks else cfg.eval.eval_walk
        results = evaluate_sets(model, sets, cfg.eval.eval_batch_size, device, walk, source)
        zeroshot = (run_zeroshot(model, tokenizer, cfg.eval, cfg.prune.calib.data_dir, device, walk, source)
                    if cfg.eval.eval_tasks else None)
        eval_s = time.perf_counter() - t
        notes = list(report.notes) + [s.note for s in sets if s.note]
        if report.units or report.retrain is not None:
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
            "precision": mode,  # what ran (--precision auto resolved; tf32 off CUDA is fp32)
            "precision_setting": cfg.prune.precision,
            "stream_dtype": cfg.prune.stream_dtype,
            "ranks": ranks.world,
            "parallel": report.parallel,
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
            "checkpoint_bytes": report.checkpoint_bytes,
            "notes": notes,
        }
        if zeroshot is not None:
            metrics["zeroshot"] = zeroshot.to_dict()
            metrics["zeroshot_markdown"] = zeroshot.to_markdown()
        if report.units:
            metrics["reconstruction"] = reconstruction_metrics(report, device, mode)
        if report.retrain is not None:
            metrics["retrain"] = retrain_metrics(report, device, mode)
        if rundir is not None and store is None:
            t = time.perf_counter()
            _make_room(rundir, checkpoint, int(model_bytes * 1.05))
            save_model(model, tokenizer, rundir.tmp)
            metrics["timing"]["save_s"] = time.perf_counter() - t
        metrics["timing"]["total_s"] = time.perf_counter() - t0
        metrics["peak_rss_mb"] = peak_rss_mb()
        if ranks.active:  # rank 0's share of the collectives (every rank moves about as much)
            metrics["distributed"] = {"ranks": ranks.world, "backend": ranks.backend, "mode": settings["parallel"],
                                      **dist.TRAFFIC.to_dict()}
        if device.type == "cuda":
            metrics["peak_gpu_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
        if rundir is not None:
            rundir.write_text("config.yaml", dump_yaml(cfg))
            if report.units:
                if plot_unit_errors(report.units, rundir.path("unit_errors.png")):
                    metrics["plots"] = ["unit_errors.png"]
                else:
                    metrics["notes"].append("unit_errors.png was not drawn: matplotlib is not installed (pip install matplotlib)")
            rundir.write_json("metrics.json", metrics)
            rundir.write_text("report.md", render_markdown(metrics))
            rundir.commit()
        for line in summary_lines(metrics):
            log.info("%s", line)
        if rundir is not None:
            log.info("saved to %s", rundir.final)
        return metrics
    except BaseException as e:
        kept = rundir is not None and checkpoint is not None and checkpoint.has_state() and not isinstance(e, CheckpointDamaged)
        if rundir is not None and not kept and not isinstance(e, CheckpointDamaged):
            rundir.discard()
        if isinstance(e, KeyboardInterrupt):
            e.resume_dir = str(rundir.final) if kept else None  # the CLI names it in its one line
            raise
        if isinstance(e, OSError):
            raise _disk_error(e, rundir, kept) from None
        if isinstance(e, PrunekitError) and kept and "--resume" not in str(e) and "--overwrite" not in str(e):
            raise PrunekitError(f"{e} (the finished windows are kept: `prunekit prune --resume {rundir.final}` continues)") from None
        if kept and not isinstance(e, PrunekitError):
            log.warning("the run stopped (%s); continue it with: prunekit prune --resume %s", type(e).__name__, rundir.final)
        raise


def _follow(cfg: RunConfig, prune_cfg, resume: bool, ranks: dist.Ranks, mode: str, stream_dir: Path | None) -> dict[str, Any]:
    """A rank other than 0: prune with the others, write nothing (rank 0 writes the run directory,
    its checkpoint, logs and progress bars); on resume, read rank 0's checkpoint."""
    logging.getLogger("prunekit").setLevel(logging.WARNING)
    os.environ["TQDM_DISABLE"] = "1"  # progress bars are rank 0's (tqdm reads this when a bar is made)
    checkpoint = store = None
    partial = RunDir.partial_of(cfg.out) if cfg.out else None
    if resume and partial is not None:
        checkpoint = Checkpointer(partial / "checkpoint", settings_fingerprint(cfg, mode), ranks.world)
    if stream_dir is not None:  # read blocks as rank 0 does; what rank 0 wrote is read from its partial output (--out is given)
        sm = StreamedModel(stream_dir, _DTYPES[cfg.model.dtype], trust_remote_code=cfg.model.trust_remote_code)
        model, tokenizer = sm.model, None
        store = StreamedBlocks(sm, None, lr_dir=partial / "checkpoint" / "lr", output=partial)  # type: ignore[operator]
    else:
        model, tokenizer = load_model(cfg.model.model, cfg.model.dtype, cfg.model.trust_remote_code, cfg.model.allow_pickle)
    with dist.failures(ranks):
        prune(model, tokenizer, prune_cfg, progress=False, checkpoint=checkpoint, store=store, ranks=ranks)
        dist.shutdown(ranks)  # a barrier: a rank lost there is reported as in pruning
    return {"rank": ranks.rank}


def _make_room(rundir: RunDir, checkpoint: Checkpointer | None, need: int) -> None:
    """Check the disk again before the model is written; delete the checkpoint first if that makes room.

    The checkpoint is kept through the save when there is room (an interruption then still resumes);
    when only its deletion makes room, it goes (all windows are done, only the save is left).
    """
    free = rundir.free_bytes()
    if free >= need:
        return
    ckpt = checkpoint.size_on_disk() if checkpoint is not None and checkpoint.has_state() else 0
    if free + ckpt >= need:
        log.info("deleting the checkpoint to make room for the saved model")
        shutil.rmtree(checkpoint.dir, ignore_errors=True)
        return
    raise OSError(errno.ENOSPC, "No space left on device", str(rundir.tmp))
