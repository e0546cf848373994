"""The one driver loop: calibrate, then walk windows of blocks in order, pruning and reconstructing.

The model stays on CPU. Block 0's inputs are captured once (:mod:`prunekit.capture`). Windows of
``window`` blocks advance by ``stride`` (block-wise: 1/1; cross-block: 2/1, giving windows [0],
[0,1], [1,2], ..., [L-1] as in the Rethinking paper). For each window, on the device:

1. advance the activation streams to the window's first block: the *sparse* stream through the
   pruned (and reconstructed) blocks, the *dense* stream through dense copies of the original blocks
   (dense copies exist only for blocks of the current window);
2. for each block of the window not yet pruned (or every block, when masks are recomputed): run the
   sparse stream up to it with hooks that accumulate its linears' input statistics (one accumulator
   per group of linears sharing an input), let the criterion choose masks (and, for SparseGPT, new
   kept weights), check every linear's sparsity;
3. reconstruct the window's units (a linear, the attention and MLP parts, the block or the window)
   by gradient descent with masks fixed, reading inputs from the sparse or dense stream and targets
   from the dense unit (local) or the dense model's activations (global), and record the normalised
   error on calibration and held-out windows.

Granularity only changes what a unit is, never the loop. With no reconstruction (the papers' "LR"
baseline) step 3 is skipped and no dense copy is made; magnitude needs no calibration pass at all.
"""

from __future__ import annotations

import copy
import logging
import time
from typing import Callable
from dataclasses import asdict, dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from . import precision
from .checkpoint import Checkpointer
from .capture import Captured, capture, propagate, run_block, to_device
from .config import CalibConfig, PruneConfig, ReconConfig, Sparsity, recon_label
from .criteria import InputStats, make_criterion
from .data import documents, sample_windows
from .errors import PrunekitError
from .families import Readout, discover, weight_matrix
from .guard import EndToEnd, GuardReport, restore, snapshot, token_error
from .losses import Objective
from .masks import check_layer, expected_fraction
from .models import context_length
from .owl import OwlResult, block_outlier_ratio, owl_sparsities
from .reconstruct import Point, UnitRecord, Window, build_units, collect, fit
from .selfgen import self_calibration
from .streams import StreamAllocator

log = logging.getLogger(__name__)


def resolve_device(setting: str) -> torch.device:
    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if setting.startswith("cuda") and not torch.cuda.is_available():
        raise PrunekitError(f"device {setting!r} asked for but no CUDA GPU is available; use --device cpu")
    try:
        return torch.device(setting)
    except RuntimeError:
        raise PrunekitError(f"unknown device {setting!r}; use auto, cpu, cuda or cuda:N") from None


def calibration_ids(model: nn.Module, tokenizer, calib: CalibConfig, device: torch.device) -> torch.Tensor:
    """``[nsamples, seqlen]`` calibration token windows from a corpus, a file, or the model itself."""
    ctx = context_length(model)
    if ctx is not None and calib.seqlen > ctx:
        raise PrunekitError(f"seqlen {calib.seqlen} exceeds the model's context of {ctx} tokens; use --seqlen {ctx} or less")
    n_self = calib.nsamples if calib.calib == "self" else round(calib.nsamples * calib.calib_mix)
    parts = []
    if n_self < calib.nsamples:
        docs = documents(calib.calib, calib.data_dir)
        parts.append(sample_windows(docs, tokenizer, calib.nsamples - n_self, calib.seqlen, calib.seed))
    if n_self:
        parts.append(
            self_calibration(model, tokenizer, n_self, calib.seqlen, calib.seed, calib.gen_batch_size, device, calib.cache_dir)
        )
    if len(parts) == 1:
        return parts[0]
    # a mix: shuffle (with the seed) so that training and held-out windows both hold both kinds
    ids = torch.cat(parts)
    return ids[torch.randperm(ids.shape[0], generator=torch.Generator().manual_seed(calib.seed))]


@dataclass
class PruneReport:
    """What a pruning run did: settings, the measured sparsity of every pruned linear, timings."""

    method: str
    sparsity: str
    scope: str
    calib: str
    nsamples: int
    seqlen: int
    per_layer: dict[str, float] = field(default_factory=dict)
    overall: float = 0.0
    pruned_params: int = 0
    timing: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    recon: dict = field(default_factory=dict)  # resolved reconstruction settings
    units: list[UnitRecord] = field(default_factory=list)  # one record per reconstructed unit
    heldout_windows: int = 0
    guard: GuardReport | None = None  # the reconstruction guard's measurements and verdict
    owl: OwlResult | None = None  # OWL's outlier ratios and block sparsities

    def error_summary(self) -> dict[str, float | None]:
        """Mean normalised error over units, before and after reconstruction, calibration and held-out."""
        out: dict[str, float | None] = {}
        for key in ("calib_before", "calib_after", "heldout_before", "heldout_after", "calib_token_before",
                    "calib_token_after", "heldout_token_before", "heldout_token_after"):
            vals = [getattr(u, key) for u in self.units if getattr(u, key) is not None]
            out[key] = sum(vals) / len(vals) if vals else None
        shares = [u.first_token_share for u in self.units if u.first_token_share is not None]
        out["first_token_share_max"] = max(shares) if shares else None
        return out

    def to_dict(self) -> dict:
        return asdict(self)


class _StatsDone(Exception):
    """Raised by the last statistics hook: nothing after the block's last linear input is needed."""


def collect_stats(
    block: nn.Module,
    groups: list[list[str]],
    linears: dict[str, nn.Module],
    inputs: torch.Tensor,
    kwargs_for: Callable[[int], dict],
    batch_size: int,
    device: torch.device,
    hessian: bool,
) -> dict[str, InputStats]:
    """Run ``inputs`` (``[n, seq, hidden]``) through ``block`` with hooks accumulating each input group's statistics.

    The pass stops at the input of the block's last linear (its output is not needed), which
    skips the largest matrix product of an MLP block.
    """
    stats: dict[str, InputStats] = {}
    handles = []
    last = groups[-1][0]
    for group in groups:
        first = linears[group[0]]
        acc = InputStats(weight_matrix(first).shape[1], hessian, device)
        stats.update({name: acc for name in group})

        def hook(_m: nn.Module, inp: tuple, acc: InputStats = acc, stop: bool = group[0] == last) -> None:
            acc.add_batch(inp[0])
            if stop:
                raise _StatsDone

        handles.append(first.register_forward_pre_hook(hook))
    try:
        for b in range(0, inputs.shape[0], batch_size):
            x = inputs[b : b + batch_size].to(device)
            try:
                run_block(block, x, to_device(kwargs_for(x.shape[0]), device))
            except _StatsDone:
                pass
    finally:
        for h in handles:
            h.remove()
    return stats


def windows(n_blocks: int, size: int, stride: int) -> list[tuple[int, int]]:
    """Half-open block ranges: size 1 gives [0], [1], ...; size 2 stride 1 gives [0], [0,1], [1,2], ..., [L-1]."""
    out = []
    for start in range(-(size - stride), n_blocks, stride):
        lo, hi = max(start, 0), min(start + size, n_blocks)
        if lo < hi:
            out.append((lo, hi))
    return out


@torch.no_grad()
def _advance(blocks: list[nn.Module], indices: list[int], captured: Captured, stream: torch.Tensor, device: torch.device) -> None:
    """Push ``stream`` in place through ``blocks`` (each moved to the device for its pass)."""
    for block, j in zip(blocks, indices):
        block.to(device)
        propagate(block, j, captured, stream, device)
        block.to("cpu")


@torch.no_grad()
@precision.for_run  # --precision for every block and unit forward pass of the run (prunekit.precision)
def prune(
    model: nn.Module,
    tokenizer,
    config: PruneConfig | None = None,
    calib_ids: torch.Tensor | None = None,
    progress: bool = True,
    checkpoint: Checkpointer | None = None,
    on_window: Callable[[int], None] | None = None,
) -> tuple[nn.Module, PruneReport]:
    """Prune ``model`` in place, window by window, reconstruct it as configured, return a :class:`PruneReport`.

    ``calib_ids`` (``[n, seqlen]`` token ids) overrides the calibration data named in the config.
    With a ``checkpoint``, the run saves its state after every window and, when the checkpoint holds
    a state, continues from it (``model`` must then be the original dense model). ``on_window(k)``
    is called after window ``k`` is finished and checkpointed.
    """
    config = config or PruneConfig()
    sparsity = config.validate()
    rc: ReconConfig = config.recon.validate()
    device = resolve_device(config.device)
    layout = discover(model)
    settings = config.sparsity
    scope = settings.resolved_scope()
    criterion = make_criterion(settings.method, sparsity, scope, settings.blocksize, settings.percdamp)
    report = PruneReport(
        method=settings.method,
        sparsity=str(sparsity),
        scope="column-block (SparseGPT)" if criterion.expected_scope() == "block" else scope,
        calib=config.calib.calib if calib_ids is None else "given",
        nsamples=config.calib.nsamples,
        seqlen=config.calib.seqlen,
        recon={k: v for k, v in vars(rc).items()},
    )
    model.eval()
    needs_streams = criterion.needs_inputs or rc.trains or rc.measures or settings.owl
    if needs_streams:
        t = time.perf_counter()
        if calib_ids is None and checkpoint is not None:
            calib_ids = checkpoint.calibration()
        if calib_ids is None:
            calib_ids = calibration_ids(model, tokenizer, config.calib, device)
        if checkpoint is not None:
            checkpoint.save_calibration(calib_ids)
        report.nsamples, report.seqlen = int(calib_ids.shape[0]), int(calib_ids.shape[1])
        report.timing["calib_s"] = time.perf_counter() - t
    else:
        report.notes.append("magnitude pruning uses no calibration data")
    n = int(calib_ids.shape[0]) if needs_streams else 0
    n_held = 0
    if needs_streams and (rc.trains or rc.measures) and rc.holdout > 0:
        if n < 2:
            raise PrunekitError("a held-out part needs at least 2 calibration windows; raise --nsamples or use --holdout 0")
        n_held = min(max(1, round(n * rc.holdout)), n - 1)
    report.heldout_windows = n_held

    t_prune = time.perf_counter()
    guarded = rc.trains and rc.guard != "off" and n_held > 0
    if rc.trains and rc.guard != "off" and n_held == 0:
        report.notes.append("the reconstruction guard is off: it needs held-out calibration windows (--holdout > 0)")
    # the guard compares each window's output with the dense model's at the same point
    needs_dense_stream = (rc.trains or rc.measures) and (rc.inputs == "dense" or rc.targets == "global" or guarded)
    # streams kept at once: sparse, dense, a unit's inputs and targets (when reconstructing); files
    # of memory-mapped streams go when the allocator is closed below or garbage-collected
    streams = StreamAllocator(config.offload, config.offload_dir, copies=4 if (rc.trains or rc.measures) else 1,
                              dtype=precision.stream_dtype(config.stream_dtype))  # --stream-dtype
    train_rows = torch.arange(n - n_held)
    held_rows = torch.arange(n - n_held, n)
    all_rows = torch.arange(n)
    bs = config.batch_size
    alloc = streams.empty
    captured = capture(model, layout.blocks, calib_ids, bs, device, progress, alloc) if needs_streams else None
    sparse = captured.hidden if captured is not None else None
    dense_stream = streams.like(sparse) if needs_dense_stream else None
    keep_dense = rc.trains or rc.measures or (rc.window > 1 and rc.recompute_masks)
    prefix = layout.family.blocks
    blocks = layout.blocks
    dense: dict[int, nn.Module] = {}
    masks: dict[int, dict[str, torch.Tensor]] = {}
    pos = 0  # the streams hold the input of block `pos`
    recon_s = 0.0
    plan = windows(len(blocks), rc.window, rc.stride)
    start = 0
    block_sparsity = [sparsity] * len(blocks)
    if settings.owl:  # dense pre-pass: block outlier ratios, then block sparsities (Yin et al. 2023)
        t = time.perf_counter()
        ratios = _outlier_ratios(layout, captured, sparse, train_rows, bs, device, settings.owl_m, streams)
        sizes = [sum(weight_matrix(m).numel() for m in layout.block_linears(j).values()) for j in range(len(blocks))]
        fractions = owl_sparsities(ratios, sizes, sparsity.fraction, settings.owl_lambda)
        block_sparsity = [Sparsity(fraction=f) for f in fractions]
        report.owl = OwlResult(settings.owl_m, settings.owl_lambda, ratios, fractions)
        report.timing["owl_s"] = time.perf_counter() - t
    guard = GuardReport(rc.guard) if guarded else None
    lr_states: dict[int, dict[str, torch.Tensor]] = {}  # masks-only weights of each pruned block (guard)
    e2e = None
    if guarded:  # the dense reference, before any block changes (on resume, model is still the original)
        t = time.perf_counter()
        e2e = EndToEnd(model, calib_ids[held_rows], bs, device)
        guard.seconds += time.perf_counter() - t
    objective = Objective(rc.loss, rc.loss_skip, _readout(model, device) if rc.loss == "kd" and rc.trains else None)
    state = checkpoint.load() if checkpoint is not None else None
    if state is not None:  # resume: finished blocks from the checkpoint, dense copies from the original
        start, pos = state["window"] + 1, state["pos"]
        for j in state["block_files"]:
            if keep_dense and j >= pos:
                dense[j] = copy.deepcopy(blocks[j])
            blocks[j].load_state_dict(checkpoint.block_state(j))
        if sparse is not None:
            sparse.copy_(state["streams"]["sparse"])
        if dense_stream is not None:
            dense_stream.copy_(state["streams"]["dense"])
        masks = state["masks"]
        saved = state["report"]
        report.per_layer, report.notes = saved["per_layer"], saved["notes"]
        report.units = [UnitRecord(**u) for u in saved["units"]]
        recon_s = saved["recon_s"]
        if guard is not None:
            lr_states = {j: checkpoint.block_state(j, lr=True) for j in state.get("lr_files", {})}
            guard.windows = list(saved.get("guard_windows", []))
            guard.seconds += saved.get("guard_s", 0.0)
        log.info("resuming after window %d of %d", start, len(plan))
    desc = f"pruning ({settings.method}{', ' + recon_label(vars(rc)) if rc.trains else ''})"
    bar = tqdm(plan, desc=desc, unit="window" if rc.window > 1 else "block", disable=not progress, initial=start)
    for k, (lo, hi) in enumerate(plan):
        if k < start:
            continue
        while pos < lo:  # advance the streams; blocks before the window are final
            if sparse is not None:
                _advance([blocks[pos]], [pos], captured, sparse, device)
            if dense_stream is not None:
                _advance([dense[pos]], [pos], captured, dense_stream, device)
            dense.pop(pos, None)
            masks.pop(pos, None)
            pos += 1
        idx = list(range(lo, hi))
        for j in idx:
            if keep_dense and j not in dense:
                dense[j] = copy.deepcopy(blocks[j])
            blocks[j].to(device)
            if j in dense:
                dense[j].to(device)
        win = Window([blocks[j] for j in idx], idx, captured, device) if captured is not None else None
        for j in idx:  # choose masks
            if j in masks and not rc.recompute_masks:
                continue
            if j in masks:  # recompute from the original weights, on the inputs the window now sees
                blocks[j].load_state_dict(dense[j].state_dict())
            linears = layout.block_linears(j)
            stats: dict[str, InputStats] = {}
            if criterion.needs_inputs:
                x = sparse[: n - n_held] if j == lo else collect(
                    Window(win.blocks[: j - lo], idx[: j - lo], captured, device), sparse, Point(win.blocks[j - lo - 1], post=True),
                    train_rows, bs,
                )
                stats = collect_stats(
                    blocks[j], layout.input_groups(j), linears, x,
                    lambda rows, j=j: captured.kwargs_for(j, rows), bs, device, criterion.needs_hessian,
                )
            masks[j] = {}
            criterion.sparsity = block_sparsity[j]
            for group in layout.input_groups(j):  # linears sharing an input are pruned together
                ws = [weight_matrix(linears[name]) for name in group]
                for name, w, (new, mask) in zip(group, ws, criterion.prune_group(ws, stats.get(group[0]))):
                    w.copy_(new)
                    masks[j][f"{prefix}.{j}.{name}"] = mask
            for acc in set(stats.values()):
                acc.free()
        if rc.trains or rc.measures:  # reconstruct the window's units
            t = time.perf_counter()
            dwin = Window([dense[j] for j in idx], idx, captured, device)
            if guard is not None:  # the window's masks-only weights and their held-out error
                tg = time.perf_counter()
                snap = {j: snapshot(blocks[j]) for j in idx}
                reference = collect(dwin, dense_stream, Point(dwin.blocks[-1], post=True), held_rows, bs)
                err_lr = token_error(collect(win, sparse, Point(win.blocks[-1], post=True), held_rows, bs), reference)
                guard.seconds += time.perf_counter() - tg
            window_masks = {k: v for j in idx for k, v in masks[j].items()}
            for unit, dunit in zip(
                build_units(layout, win, rc.granularity, prefix), build_units(layout, dwin, rc.granularity, prefix)
            ):
                if rc.inputs == "sparse":
                    inputs = collect(win, sparse, unit.input, all_rows, bs, alloc)
                else:
                    inputs = collect(dwin, dense_stream, dunit.input, all_rows, bs, alloc)
                if rc.targets == "global":
                    targets = collect(dwin, dense_stream, dunit.output, all_rows, bs, alloc)
                else:
                    targets = _apply(dunit.forward, inputs, bs, device, alloc)
                record = fit(
                    unit, window_masks, inputs, targets, train_rows, held_rows,
                    rc,
                    bs, device, config.calib.seed * 100_003 + lo, objective,
                )
                report.units.append(record)
                if record.note:
                    report.notes.append(record.note)
                del inputs, targets
            if guard is not None:  # the window's verdict: reconstructed vs masks-only, per token
                tg = time.perf_counter()
                err_rec = token_error(collect(win, sparse, Point(win.blocks[-1], post=True), held_rows, bs), reference)
                worse = not err_rec <= err_lr
                if worse and rc.guard == "revert":
                    for j in idx:
                        restore(blocks[j], snap[j])
                if worse:
                    log.warning(
                        "guard: window %s is worse than masks-only on held-out per-token error (%.4g vs %.4g)%s",
                        idx, err_rec, err_lr, "; reverted" if rc.guard == "revert" else "",
                    )
                guard.windows.append({"window": k, "blocks": idx, "lr": err_lr, "recon": err_rec, "worse": worse,
                                      "reverted": worse and rc.guard == "revert"})
                lr_states.update(snap)
                del reference, snap
                guard.seconds += time.perf_counter() - tg
            recon_s += time.perf_counter() - t
        for j in idx:  # verify every linear of the window, after any reconstruction
            for name, linear in layout.block_linears(j).items():
                full = f"{prefix}.{j}.{name}"
                w = weight_matrix(linear)
                mask = masks[j][full].to(w.device)
                report.per_layer[full] = check_layer(
                    full, w, mask, block_sparsity[j],
                    expected_fraction(tuple(w.shape), block_sparsity[j], criterion.expected_scope()),
                )
            blocks[j].to("cpu")
            if j in dense:
                dense[j].to("cpu")
        if checkpoint is not None:
            checkpoint.save(
                k, pos, {j: blocks[j] for j in idx}, {"sparse": sparse, "dense": dense_stream}, masks,
                {"per_layer": report.per_layer, "notes": report.notes, "units": [asdict(u) for u in report.units],
                 "recon_s": recon_s, "guard_windows": guard.windows if guard else [],
                 "guard_s": guard.seconds if guard else 0.0},
                {j: lr_states[j] for j in idx if j in lr_states},
            )
        bar.update(1)
        if on_window is not None:
            on_window(k)
    bar.close()
    streams.close()
    if guard is not None:
        t = time.perf_counter()
        _end_to_end(model, blocks, lr_states, e2e, guard, rc.guard)
        guard.seconds += time.perf_counter() - t
        report.guard = guard
        report.timing["guard_s"] = guard.seconds
        (log.info if not guard.end_to_end.get("worse") else log.warning)("%s", guard.summary)
    report.timing["prune_s"] = time.perf_counter() - t_prune
    if rc.trains or rc.measures:
        report.timing["recon_s"] = recon_s
    zeros = sum(round(f * _numel(model, name)) for name, f in report.per_layer.items())
    total = sum(_numel(model, name) for name in report.per_layer)
    report.overall = zeros / max(total, 1)
    report.pruned_params = total
    if getattr(criterion, "dampings", None) and max(criterion.dampings) > settings.percdamp:
        report.notes.append(f"SparseGPT raised damping to {max(criterion.dampings):g} for some layers")
    return model, report


@torch.no_grad()
def _outlier_ratios(
    layout, captured: Captured, block0_inputs: torch.Tensor, rows: torch.Tensor, batch_size: int,
    device: torch.device, m: float, streams: StreamAllocator,
) -> list[float]:
    """Each block's OWL outlier ratio on the dense model's own activations (one pass over the blocks)."""
    stream = streams.like(block0_inputs)
    stream.copy_(block0_inputs)
    ratios = []
    for j, block in enumerate(layout.blocks):
        block.to(device)
        linears = layout.block_linears(j)
        stats = collect_stats(
            block, layout.input_groups(j), linears, stream[: rows.numel()], lambda r, j=j: captured.kwargs_for(j, r),
            batch_size, device, False,
        )
        ratios.append(block_outlier_ratio(
            [weight_matrix(lin) for lin in linears.values()], [stats[name].sq_norms for name in linears], m,
        ))
        for acc in set(stats.values()):
            acc.free()
        propagate(block, j, captured, stream, device)
        block.to("cpu")
    del stream
    return ratios


def _readout(model: nn.Module, device: torch.device) -> Readout:
    """The final norm and LM head on ``device``, frozen (the kd objective reads through them)."""
    readout = Readout(model).to(device)
    for p in readout.parameters():
        p.requires_grad_(False)
    return readout


def _end_to_end(
    model: nn.Module, blocks: nn.ModuleList, lr_states: dict[int, dict[str, torch.Tensor]], e2e: EndToEnd,
    guard: GuardReport, mode: str,
) -> None:
    """Compare the reconstructed model with its masks-only weights end to end; revert the run if it is worse."""
    final = e2e.measure(model)
    if len(lr_states) < len(blocks):
        guard.conclude(final, None, False, "the masks-only weights of some blocks are missing")
        return
    kept = {j: snapshot(blocks[j]) for j in lr_states}
    for j, state in lr_states.items():
        restore(blocks[j], state)
    lr = e2e.measure(model)
    worse = not final.kl <= lr.kl
    if not (worse and mode == "revert"):
        for j, state in kept.items():
            restore(blocks[j], state)
    guard.conclude(final, lr, worse and mode == "revert", None)


def _numel(model: nn.Module, name: str) -> int:
    return model.get_submodule(name).weight.numel()


@torch.no_grad()
def _apply(fn, inputs: torch.Tensor, batch_size: int, device: torch.device, allocate) -> torch.Tensor:
    """``fn`` over ``inputs`` batch by batch, into a new stream."""
    out = None
    for b in range(0, inputs.shape[0], batch_size):
        y = fn(inputs[b : b + batch_size].to(device)).to("cpu", inputs.dtype)
        if out is None:
            out = allocate((inputs.shape[0], *y.shape[1:]), y.dtype)
        out[b : b + y.shape[0]] = y
    return out
