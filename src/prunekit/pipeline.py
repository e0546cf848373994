"""The one driver loop: calibrate, then walk windows of blocks in order, pruning and reconstructing.

Block 0's inputs are captured once (:mod:`prunekit.capture`). Windows of ``window`` blocks advance
by ``stride`` (block-wise: 1/1; cross-block: 2/1, giving windows [0], [0,1], [1,2], ..., [L-1] as in
the Rethinking paper). :func:`prune` is a short loop whose body reads as phases over one
:class:`RunState` (what changes as windows finish, and saves and restores itself for resume):

1. ``_advance``: push the activation streams to the window's first block: the *sparse* stream
   through the pruned (and reconstructed) blocks, the *dense* stream through dense copies of the
   original blocks (dense copies exist only for blocks of the current window); blocks the streams
   have passed are final;
2. ``_choose_masks``: for each block of the window not yet pruned (or every block, when masks are
   recomputed), run the sparse stream up to it with hooks that accumulate its linears' input
   statistics (one accumulator per group of linears sharing an input), let the criterion choose
   masks (and, for SparseGPT, new kept weights);
3. ``_reconstruct``: fit the window's units (a linear, the attention and MLP parts, the block or the
   window) by gradient descent with masks fixed, reading inputs from the sparse or dense stream and
   targets from the dense unit (local) or the dense model's activations (global); record the
   normalised errors; the guard's per-window verdict;
4. ``_verify``: check every linear against its mask and sparsity;
5. ``RunState.save``: the lean checkpoint (:mod:`prunekit.checkpoint`).

Where blocks live is the store's business (:mod:`prunekit.blockstore`): in the model in RAM, or
read from safetensors shards when first needed and written to the output when final. Granularity
only changes what a unit is, never the loop. With no reconstruction (the papers' "LR" baseline)
step 3 is skipped and no dense copy is made; magnitude needs no calibration pass at all. Under
torchrun (:mod:`prunekit.dist`) the same phases run on every rank: data-parallel, each rank holds
some of the windows and the sums over windows are summed over ranks; block-parallel, each rank
reconstructs its own blocks and they are gathered after the loop.
"""

from __future__ import annotations

import logging
import time
from typing import Callable
from dataclasses import asdict, dataclass, field, replace

import torch
from torch import nn
from tqdm.auto import tqdm

from . import precision
from .blockstore import InMemoryBlocks, StreamedBlocks
from .checkpoint import Checkpointer
from .capture import Captured, capture, propagate, run_block, to_device
from .config import CalibConfig, PruneConfig, ReconConfig, Sparsity, recon_label
from .criteria import Criterion, InputStats, make_criterion
from .data import documents, sample_windows
from .dist import Ranks, choose_mode, weights_digest
from .errors import PrunekitError
from .families import Layout, Readout, discover, weight_matrix
from .guard import EndToEnd, GuardReport, restore, snapshot, token_error
from .hostmem import park
from .losses import Objective
from .masks import check_layer, expected_fraction
from .models import context_length
from .owl import OwlResult, block_outlier_ratio, owl_sparsities
from .probe import StopAt
from .reconstruct import FitData, Point, UnitRecord, Window, build_units, collect, fit
from .retrain import Retrain, RetrainRecord
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


def _shares_span(window: torch.Tensor, spans: set[tuple[int, ...]], k: int) -> bool:
    """Whether ``window`` holds any of ``spans`` (runs of ``k`` tokens)."""
    w = window.tolist()
    return any(tuple(w[i : i + k]) in spans for i in range(len(w) - k + 1))


def retrain_windows(
    model: nn.Module, tokenizer, calib: CalibConfig, n: int, held: torch.Tensor, device: torch.device, k: int = 32,
) -> tuple[torch.Tensor, int]:
    """``n`` fresh training windows for end-to-end retraining followed by the ``held`` windows, and how
    many drawn windows were redrawn.

    Windows are drawn as the calibration windows are, with seeds ``calib.seed + 1``, ``+ 2``, ...;
    a drawn window that shares a run of ``k`` tokens (at most half a window) with a held-out window
    (an overlapping slice of the same document) is redrawn, so the held-out loss stays a held-out one.
    """
    k = min(k, max(2, held.shape[1] // 2))  # short windows: half a window
    spans = {tuple(w[i : i + k]) for w in held.tolist() for i in range(len(w) - k + 1)}
    kept: list[torch.Tensor] = []
    dropped, seed = 0, calib.seed
    while len(kept) < n:
        seed += 1
        if seed > calib.seed + 20:
            raise PrunekitError(
                f"could not draw {n} retraining windows that avoid the held-out ones; lower --retrain-nsamples"
            )
        drawn = calibration_ids(model, tokenizer, replace(calib, nsamples=n - len(kept), seed=seed), device)
        for w in drawn:
            if _shares_span(w, spans, k):
                dropped += 1
            else:
                kept.append(w)
    return torch.cat([torch.stack(kept), held]), dropped


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
    checkpoint_bytes: int = 0  # bytes the run's checkpoint wrote (across resumes)
    retrain: RetrainRecord | None = None  # end-to-end retraining after the layer-wise pass (--recon retrain)
    parallel: str = "single"  # single | data | block: how the ranks of a torchrun job shared the work (prunekit.dist)

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


def collect_stats(
    block: nn.Module,
    groups: list[list[str]],
    linears: dict[str, nn.Module],
    inputs: torch.Tensor,
    kwargs_for: Callable[[int], dict],
    batch_size: int,
    device: torch.device,
    hessian: bool,
    ranks: Ranks = Ranks(),
) -> dict[str, InputStats]:
    """Run ``inputs`` (``[n, seq, hidden]``) through ``block`` with hooks accumulating each input group's statistics.

    The pass stops at the input of the block's last linear (its output is not needed), which
    skips the largest matrix product of an MLP block. In a data-parallel run the statistics are
    then summed over ranks (each ran its own windows).
    """
    stats: dict[str, InputStats] = {}
    handles = []
    for group in groups:
        acc = InputStats(weight_matrix(linears[group[0]]).shape[1], hessian, device)
        stats.update({name: acc for name in group})
    for group in groups[:-1]:
        handles.append(linears[group[0]].register_forward_pre_hook(lambda _m, inp, acc=stats[group[0]]: acc.add_batch(inp[0])))
    last = groups[-1][0]
    try:
        with StopAt(linears[last], observe=stats[last].add_batch) as stop:
            for b in range(0, inputs.shape[0], batch_size):
                x = inputs[b : b + batch_size].to(device)
                stop.run(run_block, block, x, to_device(kwargs_for(x.shape[0]), device))
    finally:
        for h in handles:
            h.remove()
    for group in groups:  # in the same order on every rank
        stats[group[0]].all_reduce(ranks)
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
def _push(block: nn.Module, j: int, captured: Captured, stream: torch.Tensor, device: torch.device) -> None:
    """Push ``stream`` in place through ``block`` (moved to the device for its pass)."""
    block.to(device)
    propagate(block, j, captured, stream, device)
    park(block)


@dataclass
class _Run:
    """What a run fixes at its start and every phase reads."""

    layout: Layout
    rc: ReconConfig
    criterion: Criterion
    device: torch.device
    batch_size: int
    captured: Captured | None
    n: int  # calibration windows
    n_held: int  # the last n_held of them are held out (reconstruction's criterion, the guard)
    block_sparsity: list[Sparsity]
    keep_dense: bool  # dense copies of the window's blocks are needed
    objective: Objective
    allocate: Callable[[tuple[int, ...], torch.dtype], torch.Tensor]
    seed: int
    store: InMemoryBlocks | StreamedBlocks  # where blocks live (RAM, or streamed from and to shards)
    retrain: Retrain | None = None  # --recon retrain: prepared on the dense model, run after the last window
    ranks: Ranks = field(default_factory=Ranks)  # several processes (prunekit.dist)
    mode: str = "single"  # single | data (windows split across ranks) | block (blocks split across ranks)
    train_offset: int = 0  # data-parallel: global index of this rank's first training window
    train_total: int | None = None  # data-parallel: training windows over all ranks
    local_batches: bool = False  # data-parallel: --dp-batches local

    @property
    def data_ranks(self) -> Ranks:
        """The ranks that sums over windows run across: all of them data-parallel, none otherwise."""
        return self.ranks if self.mode == "data" else Ranks()

    @property
    def independent(self) -> bool:
        """Independent units (:attr:`ReconConfig.independent_units`): the sparse stream (for the masks)
        then passes the masks-only weights, so the masks are the layer-wise pass's and no block's
        reconstruction changes another's data."""
        return self.rc.independent_units

    @property
    def blocks(self) -> nn.ModuleList:
        return self.layout.blocks

    @property
    def prefix(self) -> str:
        return self.layout.family.blocks

    @property
    def train_rows(self) -> torch.Tensor:
        return torch.arange(self.n - self.n_held)

    @property
    def held_rows(self) -> torch.Tensor:
        return torch.arange(self.n - self.n_held, self.n)

    @property
    def all_rows(self) -> torch.Tensor:
        return torch.arange(self.n)


@dataclass
class RunState:
    """What changes as windows finish: saved after every window, restored on resume.

    The streams hold the input of block ``pos`` (``sparse``: through the pruned blocks; ``dense``:
    through dense copies), ``dense`` the dense copies of blocks from ``pos`` on that are still
    needed, ``masks`` the masks of blocks that windows may still change, ``lr_states`` the
    masks-only weights of pruned blocks (for the guard's end-to-end check).
    """

    report: PruneReport
    sparse: torch.Tensor | None
    dense_stream: torch.Tensor | None
    guard: GuardReport | None
    window: int = 0  # the next window to run
    pos: int = 0
    dense: dict[int, nn.Module] = field(default_factory=dict)
    masks: dict[int, dict[str, torch.Tensor]] = field(default_factory=dict)
    lr_states: dict[int, dict[str, torch.Tensor]] = field(default_factory=dict)
    # independent units (see _Run.independent): masks-only weights the sparse stream has still to pass
    lr_next: dict[int, dict[str, torch.Tensor]] = field(default_factory=dict)
    recon_s: float = 0.0
    keep_masks: bool = False  # keep every block's masks to the end (end-to-end retraining needs them)
    # seconds that pushing the streams through the blocks finished since they were last checkpointed
    # took: what a resume would spend replaying them (see save)
    replay_s: float = 0.0

    def save(self, checkpoint: Checkpointer, k: int, store: InMemoryBlocks | StreamedBlocks, idx: list[int],
             next_lo: int, every_s: float | None) -> None:
        """Record that window ``k`` (blocks ``idx``) is finished; blocks below ``next_lo`` are final.

        Final blocks are written once: into the checkpoint, or, streaming, into the output shards
        (``store.persist``). A resumed run replays the last saved streams through the blocks
        finished since, so the streams are written only when that replay would take ``every_s``
        seconds or more (measured: the time those pushes took; 0: after every window; None: never,
        as in a data-parallel run, where each rank holds its own windows). A resume then never
        replays longer than ``every_s``, as when streams were saved every ``every_s`` of wall time,
        but a run whose windows are mostly reconstruction, or masks, writes them far less often.
        """
        with_streams = every_s is not None and self.replay_s >= every_s
        guard = self.guard
        final = [j for j in idx if j < next_lo]
        elsewhere = [j for j in final if store.persist(j)]
        blocks = store.blocks
        checkpoint.save(
            k, self.pos,
            final={j: blocks[j] for j in final if j not in elsewhere},
            pending={j: blocks[j] for j in idx if j >= next_lo},
            masks={j: m for j, m in self.masks.items() if j >= next_lo},
            report={"per_layer": self.report.per_layer, "notes": self.report.notes,
                    "units": [asdict(u) for u in self.report.units], "recon_s": self.recon_s,
                    "guard_windows": guard.windows if guard else [], "guard_s": guard.seconds if guard else 0.0,
                    "checkpoint_bytes": checkpoint.bytes_written},
            lr_states={j: self.lr_states.get(j, self.lr_next.get(j)) for j in final if j in self.lr_states or j in self.lr_next},
            streams={"sparse": self.sparse, "dense": self.dense_stream} if with_streams else None,
            final_elsewhere=sorted(getattr(store, "written", ())),
            final_masks={j: self.masks[j] for j in final if j in self.masks} if self.keep_masks else None,
        )
        if with_streams:
            self.replay_s = 0.0
        self.window = k + 1

    def restore(self, checkpoint: Checkpointer, store: InMemoryBlocks | StreamedBlocks, keep_dense: bool,
                captured: Captured | None, device: torch.device, independent: bool = False) -> bool:
        """Continue from the checkpoint's last state (the store's blocks are still the original ones); False if none.

        The streams come back from the last saved ones (or block 0's inputs, just captured again)
        pushed through the finished blocks in between, exactly as the interrupted run pushed them:
        the dense stream through each block's original weights, then the sparse one through its
        final weights.
        """
        state = checkpoint.load()
        if state is None:
            return False
        self.window, self.pos = state["window"] + 1, state["pos"]
        store.resumed(state["final_elsewhere"])
        if independent:  # the sparse stream passes masks-only weights (see _Run.independent)
            self.lr_next = {j: checkpoint.block_state(j, "lr") for j in state["final_lr"]}
        saved = state["streams"]
        t_replay = time.perf_counter()
        start = 0
        if saved is not None:
            start = saved["pos"]
            if self.sparse is not None:
                self.sparse.copy_(saved["sparse"])
            if self.dense_stream is not None:
                self.dense_stream.copy_(saved["dense"])
        for j in sorted({*state["final"], *state["final_elsewhere"]}):
            if j < start:  # passed by the saved streams
                self.lr_next.pop(j, None)
                if not store.streamed:
                    store.blocks[j].load_state_dict(store.final_state(j, checkpoint))
            elif j < self.pos:  # replay the streams through it
                if self.dense_stream is not None:
                    _push(store.visit(j, device), j, captured, self.dense_stream, device)
                    store.leave(j)
                block = store.open(j, torch.device("cpu"))
                lr = self.lr_next.pop(j, None)
                block.load_state_dict(lr if lr is not None else store.final_state(j, checkpoint))
                if self.sparse is not None:
                    _push(block, j, captured, self.sparse, device)
                if lr is not None:
                    block.load_state_dict(store.final_state(j, checkpoint))
                store.finish(j)
            else:  # the streams have not passed it: a dense copy from the original, then its final weights
                if keep_dense:
                    self.dense[j] = store.dense_copy(j)
                store.open(j, torch.device("cpu")).load_state_dict(store.final_state(j, checkpoint))
        for j in state["pending"]:
            if keep_dense:
                self.dense[j] = store.dense_copy(j)
            store.open(j, torch.device("cpu")).load_state_dict(checkpoint.block_state(j, "pending"))
        self.masks = state["masks"]
        saved_report = state["report"]
        self.report.per_layer, self.report.notes = saved_report["per_layer"], saved_report["notes"]
        self.report.units = [UnitRecord(**u) for u in saved_report["units"]]
        self.recon_s = saved_report["recon_s"]
        if self.guard is not None:
            self.lr_states = {j: checkpoint.block_state(j, "lr") for j in state["final_lr"]}
            self.guard.windows = list(saved_report.get("guard_windows", []))
            self.guard.seconds += saved_report.get("guard_s", 0.0)
        self.replay_s = time.perf_counter() - t_replay  # a second interruption would replay as much again
        return True


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
    store: StreamedBlocks | None = None,
    ranks: Ranks | None = None,
) -> tuple[nn.Module, PruneReport]:
    """Prune ``model`` in place, window by window, reconstruct it as configured, return a :class:`PruneReport`.

    ``calib_ids`` (``[n, seqlen]`` token ids) overrides the calibration data named in the config.
    With a ``checkpoint``, the run saves its state after every window and, when the checkpoint holds
    a state, continues from it (``model`` must then be the original dense model). ``on_window(k)``
    is called after window ``k`` is finished and checkpointed. With a ``store``
    (:class:`prunekit.blockstore.StreamedBlocks`), ``model`` is its meta-device skeleton: blocks are
    read from the input shards when needed and written to the output shards when final.

    With ``ranks`` (several processes under torchrun, :mod:`prunekit.dist`) every rank calls this
    with the same arguments: data-parallel, each keeps its share of the windows; block-parallel,
    each reconstructs its own blocks and all end with every block. Only rank 0 writes the
    checkpoint (the others read it to resume) and draws progress bars.
    """
    config = config or PruneConfig()
    ranks = ranks or Ranks()
    progress = progress and ranks.main
    t_prune = time.perf_counter()
    run, state, streams, e2e = _start(model, tokenizer, config, calib_ids, progress, checkpoint, store or InMemoryBlocks(model), ranks)
    rc, report = run.rc, state.report
    plan = windows(len(run.blocks), rc.window, rc.stride)
    if checkpoint is not None and state.restore(checkpoint, run.store, run.keep_dense, run.captured, run.device, run.independent):
        log.info("resuming after window %d of %d", state.window, len(plan))
    ranks.barrier()  # every rank has read the checkpoint before rank 0 writes the next window's
    desc = f"pruning ({config.sparsity.method}{', ' + recon_label(vars(rc)) if rc.trains else ''})"
    bar = tqdm(plan, desc=desc, unit="window" if rc.window > 1 else "block", disable=not progress, initial=state.window)
    sending: list = []  # block-parallel: this rank's finished blocks on their way to rank 0
    for k, (lo, hi) in enumerate(plan):
        if k < state.window:
            continue
        idx = list(range(lo, hi))
        _advance(run, state, lo)
        win = _open_window(run, state, idx)
        _choose_masks(run, state, win, idx)
        made = _Made.of(state)
        if (rc.trains or rc.measures) and (run.mode != "block" or ranks.owns_block(idx[0])):
            _reconstruct(run, state, win, idx, k)
        elif run.independent:  # block-parallel, another rank's block: its masks-only weights, for the sparse stream
            state.lr_next.update({j: snapshot(run.blocks[j]) for j in idx})
        _verify(run, state, idx)
        if run.mode == "block" and (rc.trains or rc.measures):
            _hand_over(run, state, idx, k, made, sending)
        if checkpoint is not None and ranks.main:
            next_lo = plan[k + 1][0] if k + 1 < len(plan) else len(run.blocks)
            state.save(checkpoint, k, run.store, idx, next_lo, None if run.mode == "data" else config.checkpoint_every * 60)
        bar.update(1)
        if on_window is not None:
            on_window(k)
    bar.close()
    Ranks.wait(sending)
    for j in range(state.pos, len(run.blocks)):
        run.store.finish(j)
    streams.close()
    if run.mode == "block":
        _gather_blocks(run, state)
    if ranks.active and not run.store.streamed:  # every rank must end with the same model: a cheap fingerprint, compared
        ranks.check_same(weights_digest(run.blocks), "the pruned weights")
    ranks.barrier()  # the other ranks are done reading rank 0's output before it finishes it
    if run.retrain is not None:  # the whole pruned model trained end to end, masks fixed (prunekit.retrain)
        t = time.perf_counter()
        masks = {name: m for j in sorted(state.masks) for name, m in state.masks[j].items()}
        report.retrain = run.retrain.run(model, run.layout, masks, run.seed)
        if report.retrain.note:
            report.notes.append(report.retrain.note)
        _verify(run, state, list(range(len(run.blocks))))  # every linear against its mask, after training
        report.timing["retrain_s"] = time.perf_counter() - t + run.retrain.prepare_s
    if state.guard is not None:
        t = time.perf_counter()
        if e2e is None:
            state.guard.conclude(None, None, False, "the masks-only weights of the streamed blocks were not kept")
        elif run.store.streamed:
            _end_to_end_streamed(run.store, e2e, state.guard, rc.guard, run.device, ranks)
        else:
            _end_to_end(model, run.blocks, state.lr_states, e2e, state.guard, rc.guard)
        state.guard.seconds += time.perf_counter() - t
        report.guard = state.guard
        report.timing["guard_s"] = state.guard.seconds
        (log.info if not state.guard.end_to_end.get("worse") else log.warning)("%s", state.guard.summary)
    run.store.close()  # streaming: the embeddings and head to the output (and, reverted, the masks-only blocks)
    report.timing["prune_s"] = time.perf_counter() - t_prune - report.timing.get("calib_s", 0.0)
    if checkpoint is not None:
        report.checkpoint_bytes = checkpoint.bytes_written
    if rc.trains or rc.measures:
        report.timing["recon_s"] = state.recon_s
    zeros = sum(round(f * _numel(model, name)) for name, f in report.per_layer.items())
    total = sum(_numel(model, name) for name in report.per_layer)
    report.overall = zeros / max(total, 1)
    report.pruned_params = total
    if getattr(run.criterion, "dampings", None) and max(run.criterion.dampings) > config.sparsity.percdamp:
        report.notes.append(f"SparseGPT raised damping to {max(run.criterion.dampings):g} for some layers")
    return model, report


def _start(
    model: nn.Module, tokenizer, config: PruneConfig, calib_ids: torch.Tensor | None, progress: bool,
    checkpoint: Checkpointer | None, store: InMemoryBlocks | StreamedBlocks, ranks: Ranks = Ranks(),
) -> tuple[_Run, RunState, StreamAllocator, EndToEnd | None]:
    """Validate the settings, calibrate, capture block 0's inputs, and set up the run's fixed parts and state."""
    sparsity = config.validate()
    rc: ReconConfig = config.recon.validate()
    mode = choose_mode(config.parallel, rc.inputs, rc.targets, rc.window, rc.trains, ranks)
    if ranks.active:  # every rank must run the same job on the same model: refused at start, not hours later
        placement = ("device", "offload", "offload_dir", "checkpoint_every", "dist_timeout")
        ranks.check_same(repr({k: v for k, v in asdict(config).items() if k not in placement}), "the settings")
        if store.streamed:  # the skeleton has no weights yet: the files they come from
            files = sorted((p.name, p.stat().st_size) for p in store.sm.checkpoint.files)
            ranks.check_same(repr(files), "the model's files")
        else:
            ranks.check_same(weights_digest(model), "the model's weights")
        log.info("%d ranks (%s), %s-parallel", ranks.world, ranks.backend, mode)
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
        parallel=mode,
    )
    model.eval()
    if rc.retrain_nsamples and ranks.active:
        raise PrunekitError("--retrain-nsamples runs in one process for now; drop it or run without torchrun")
    if rc.retrains and store.streamed:
        raise PrunekitError("--recon retrain trains the whole model at once and needs it in memory, not streamed from disk; use --weights memory")
    needs_streams = criterion.needs_inputs or rc.trains or rc.measures or settings.owl
    if needs_streams or rc.retrains:
        t = time.perf_counter()
        if calib_ids is None and checkpoint is not None and ranks.main:
            calib_ids = checkpoint.calibration()
        if calib_ids is None and ranks.main:  # the other ranks receive rank 0's windows below
            if store.streamed and (config.calib.calib == "self" or config.calib.calib_mix > 0):
                raise PrunekitError(
                    "self-generated calibration needs the whole model in memory, not weights streamed from disk; "
                    "calibrate on a corpus (--calib c4) or use --weights memory"
                )
            calib_ids = calibration_ids(model, tokenizer, config.calib, device)
        calib_ids = ranks.broadcast_object(calib_ids)  # every rank calibrates on rank 0's windows
        if checkpoint is not None and ranks.main:
            checkpoint.save_calibration(calib_ids)
        report.nsamples, report.seqlen = int(calib_ids.shape[0]), int(calib_ids.shape[1])
        report.timing["calib_s"] = time.perf_counter() - t
    else:
        report.notes.append("magnitude pruning uses no calibration data")
    n = int(calib_ids.shape[0]) if needs_streams or rc.retrains else 0
    n_held = 0
    if n and (rc.trains or rc.measures or rc.retrains) and rc.holdout > 0:
        if n < 2:
            raise PrunekitError("a held-out part needs at least 2 calibration windows; raise --nsamples or use --holdout 0")
        n_held = min(max(1, round(n * rc.holdout)), n - 1)
    report.heldout_windows = n_held
    train_offset, train_total = 0, None
    if mode == "data" and n:  # this rank's share of the training and of the held-out windows
        n_train = n - n_held
        if n_train < ranks.world or 0 < n_held < ranks.world:
            raise PrunekitError(
                f"{ranks.world} data-parallel ranks need at least {ranks.world} training and {ranks.world} held-out "
                f"calibration windows (have {n_train} and {n_held}); raise --nsamples or start fewer ranks"
            )
        (t0, t1), (h0, h1) = ranks.split(n_train), ranks.split(n_held)
        calib_ids = torch.cat([calib_ids[t0:t1], calib_ids[n_train + h0 : n_train + h1]])
        n, n_held, train_offset, train_total = int(calib_ids.shape[0]), h1 - h0, t0, n_train
    guarded = rc.trains and rc.guard != "off" and n_held > 0
    if rc.trains and rc.guard != "off" and n_held == 0:
        report.notes.append("the reconstruction guard is off: it needs held-out calibration windows (--holdout > 0)")
    if guarded and store.streamed and not store.keeps_lr:
        report.notes.append(
            "weights streamed from disk: the guard judged each window on held-out windows; its end-to-end check "
            "(which needs the whole model's masks-only weights) did not run"
        )
    # the guard compares each window's output with the dense model's at the same point
    needs_dense_stream = (rc.trains or rc.measures) and (rc.inputs == "dense" or rc.targets == "global" or guarded)
    # streams kept at once: sparse, dense, a unit's inputs and targets (when reconstructing); files
    # of memory-mapped streams go when the allocator is closed or garbage-collected
    streams = StreamAllocator(config.offload, config.offload_dir, copies=4 if (rc.trains or rc.measures) else 1,
                              dtype=precision.stream_dtype(config.stream_dtype), device=device)  # --stream-dtype
    bs = config.batch_size
    captured = None
    if needs_streams:
        with store.stems():
            captured = capture(model, layout.blocks, calib_ids, bs, device, progress, streams.empty)
    if rc.loss == "kd" and rc.trains:
        store.head()
    sparse = captured.hidden if captured is not None else None
    run = _Run(
        layout=layout, rc=rc, criterion=criterion, device=device, batch_size=bs, captured=captured, n=n, n_held=n_held,
        block_sparsity=[sparsity] * len(layout.blocks),
        keep_dense=rc.trains or rc.measures or (rc.window > 1 and rc.recompute_masks),
        objective=Objective(rc.loss, rc.loss_skip, _readout(model, device) if rc.loss == "kd" and rc.trains else None),
        allocate=streams.empty, seed=config.calib.seed, store=store,
        ranks=ranks, mode=mode, train_offset=train_offset, train_total=train_total, local_batches=config.dp_batches == "local",
    )
    state = RunState(
        report=report, sparse=sparse, dense_stream=streams.like(sparse) if needs_dense_stream else None,
        guard=GuardReport(rc.guard) if guarded else None, keep_masks=rc.retrains,
    )
    if settings.owl:  # dense pre-pass: block outlier ratios, then block sparsities (Yin et al. 2023)
        t = time.perf_counter()
        ratios = _outlier_ratios(layout, captured, sparse, run.train_rows, bs, device, settings.owl_m, streams, store,
                                 run.data_ranks)
        sizes = [sum(weight_matrix(m).numel() for m in layout.block_linears(j).values()) for j in range(len(layout.blocks))]
        fractions = owl_sparsities(ratios, sizes, sparsity.fraction, settings.owl_lambda)
        run.block_sparsity = [Sparsity(fraction=f) for f in fractions]
        report.owl = OwlResult(settings.owl_m, settings.owl_lambda, ratios, fractions)
        report.timing["owl_s"] = time.perf_counter() - t
    e2e = None
    if guarded and (not store.streamed or store.keeps_lr):
        # the dense reference, before any block changes (on resume, the model is still the original)
        t = time.perf_counter()
        if store.streamed:  # read block by block from the input shards
            source = store.dense_source(device)
            e2e = EndToEnd(source.sm.model, calib_ids[run.held_rows], bs, device, source, run.data_ranks)
        else:
            e2e = EndToEnd(model, calib_ids[run.held_rows], bs, device, ranks=run.data_ranks)
        state.guard.seconds += time.perf_counter() - t
    if rc.retrains:  # reads the dense model (kd teacher, the guard's reference): before any block changes
        ids, train_rows, held_rows = calib_ids, run.train_rows, run.held_rows
        if rc.retrain_nsamples:
            ids, dropped = retrain_windows(model, tokenizer, config.calib, rc.retrain_nsamples, calib_ids[held_rows], device)
            train_rows, held_rows = torch.arange(rc.retrain_nsamples), torch.arange(rc.retrain_nsamples, ids.shape[0])
            report.notes.append(
                f"retraining trained on {rc.retrain_nsamples} fresh windows (seed {config.calib.seed + 1} onwards) instead of the "
                f"calibration's {n - n_held}; {dropped} drawn windows that overlapped a held-out window were redrawn"
            )
        run.retrain = Retrain(model, ids, train_rows, held_rows, rc, bs, device,
                              precision.stream_dtype(config.stream_dtype), run.data_ranks, run.train_offset,
                              run.train_total, run.local_batches)
    return run, state, streams, e2e


def _advance(run: _Run, state: RunState, lo: int) -> None:
    """Phase 1: push the streams to the window's first block; blocks before it are final."""
    while state.pos < lo:
        j = state.pos
        t = time.perf_counter()
        lr = state.lr_next.pop(j, None)
        if state.sparse is not None and lr is not None:  # independent units: the masks-only weights (see _Run.independent)
            final = snapshot(run.blocks[j])
            restore(run.blocks[j], lr)
            _push(run.blocks[j], j, run.captured, state.sparse, run.device)
            restore(run.blocks[j], final)
        elif state.sparse is not None:
            _push(run.blocks[j], j, run.captured, state.sparse, run.device)
        if state.dense_stream is not None:
            _push(state.dense[j], j, run.captured, state.dense_stream, run.device)
        state.replay_s += time.perf_counter() - t
        state.dense.pop(j, None)
        if not state.keep_masks:
            state.masks.pop(j, None)
        run.store.finish(j)
        state.pos += 1


def _open_window(run: _Run, state: RunState, idx: list[int]) -> Window | None:
    """The window's blocks (and their dense copies, made when first needed) on the device."""
    for j in idx:
        if run.keep_dense and j not in state.dense:
            state.dense[j] = run.store.dense_copy(j)
        run.store.open(j, run.device)
        if j in state.dense:
            state.dense[j].to(run.device)
    if run.captured is None:
        return None
    return Window([run.blocks[j] for j in idx], idx, run.captured, run.device)


def _choose_masks(run: _Run, state: RunState, win: Window | None, idx: list[int]) -> None:
    """Phase 2: masks (and, for SparseGPT, new kept weights) for every block of the window not yet pruned.

    With ``recompute_masks``, blocks pruned by an earlier window are pruned again from their
    original weights, on the inputs the window now sees.
    """
    layout, criterion, lo, n_train = run.layout, run.criterion, idx[0], run.n - run.n_held
    for j in idx:
        if j in state.masks and not run.rc.recompute_masks:
            continue
        if j in state.masks:
            run.blocks[j].load_state_dict(state.dense[j].state_dict())
        linears = layout.block_linears(j)
        stats: dict[str, InputStats] = {}
        if criterion.needs_inputs:
            x = state.sparse[:n_train] if j == lo else collect(
                Window(win.blocks[: j - lo], idx[: j - lo], run.captured, run.device), state.sparse,
                Point(win.blocks[j - lo - 1], post=True), run.train_rows, run.batch_size,
            )
            stats = collect_stats(
                run.blocks[j], layout.input_groups(j), linears, x,
                lambda rows, j=j: run.captured.kwargs_for(j, rows), run.batch_size, run.device, criterion.needs_hessian,
                run.data_ranks,
            )
        state.masks[j] = {}
        criterion.sparsity = run.block_sparsity[j]
        for group in layout.input_groups(j):  # linears sharing an input are pruned together
            ws = [weight_matrix(linears[name]) for name in group]
            for name, w, (new, mask) in zip(group, ws, criterion.prune_group(ws, stats.get(group[0]))):
                w.copy_(new)
                state.masks[j][f"{run.prefix}.{j}.{name}"] = mask
        for acc in set(stats.values()):
            acc.free()


def _reconstruct(run: _Run, state: RunState, win: Window, idx: list[int], k: int) -> None:
    """Phase 3: fit the window's units with masks fixed; then the guard's per-window verdict."""
    t = time.perf_counter()
    rc, bs, guard = run.rc, run.batch_size, state.guard
    dwin = Window([state.dense[j] for j in idx], idx, run.captured, run.device)
    ranks = run.data_ranks
    if run.independent:  # the sparse stream will pass the masks-only weights (see _Run.independent)
        state.lr_next.update({j: snapshot(run.blocks[j]) for j in idx})
    if guard is not None:  # the window's masks-only weights and their held-out error
        tg = time.perf_counter()
        snap = run.store.held()  # streaming: on disk while the window trains
        for j in idx:
            snap[j] = state.lr_next[j] if j in state.lr_next else snapshot(run.blocks[j])
        reference = collect(dwin, state.dense_stream, Point(dwin.blocks[-1], post=True), run.held_rows, bs)
        err_lr = token_error(collect(win, state.sparse, Point(win.blocks[-1], post=True), run.held_rows, bs), reference, ranks)
        guard.seconds += time.perf_counter() - tg
    window_masks = {name: m for j in idx for name, m in state.masks[j].items()}
    units = list(zip(build_units(run.layout, win, rc.granularity, run.prefix), build_units(run.layout, dwin, rc.granularity, run.prefix)))
    for u, (unit, dunit) in enumerate(units):
        if rc.inputs == "sparse":
            inputs = collect(win, state.sparse, unit.input, run.all_rows, bs, run.allocate)
        else:
            inputs = collect(dwin, state.dense_stream, dunit.input, run.all_rows, bs, run.allocate)
        if rc.targets == "global":
            targets = collect(dwin, state.dense_stream, dunit.output, run.all_rows, bs, run.allocate)
        else:
            targets = _apply(dunit.forward, inputs, bs, run.device, run.allocate)
        data = FitData(inputs, targets, run.train_rows, run.held_rows, bs, run.device, ranks, run.train_offset, run.train_total,
                       run.local_batches, state.report.heldout_windows if ranks.active else None, run.store.streamed)
        held = snap if guard is not None else state.lr_next if run.independent else None
        restore_before = None
        if held is not None and [id(m) for m in unit.modules] == [id(b) for b in win.blocks]:  # the unit is the window
            restore_before = lambda held=held: [restore(run.blocks[j], held[j]) for j in idx]  # noqa: E731
        for j, block in zip(idx, dwin.blocks):  # the dense blocks wait on the host while the unit trains:
            park(block)  # their outputs are taken (a GPU block-size less at the peak; no-op on a CPU);
            run.store.evict_dense(j, block)  # streaming: not even there (re-read from the shards after)
        record = fit(unit, window_masks, data, rc, run.seed * 100_003 + idx[0], run.objective, restore_before)
        for j, block in zip(idx, dwin.blocks):
            run.store.reload_dense(j, block)
            if u + 1 < len(units):  # the next unit's inputs or targets come from the dense blocks
                block.to(run.device)
        state.report.units.append(record)
        if record.note:
            state.report.notes.append(record.note)
        del inputs, targets, data
    if guard is not None:  # the window's verdict: reconstructed vs masks-only, per token
        tg = time.perf_counter()
        err_rec = token_error(collect(win, state.sparse, Point(win.blocks[-1], post=True), run.held_rows, bs), reference, ranks)
        worse = not err_rec <= err_lr
        if worse and rc.guard == "revert":
            for j in idx:
                restore(run.blocks[j], snap[j])
        if worse:
            log.warning(
                "guard: window %s is worse than masks-only on held-out per-token error (%.4g vs %.4g)%s",
                idx, err_rec, err_lr, "; reverted" if rc.guard == "revert" else "",
            )
        guard.windows.append({"window": k, "blocks": idx, "lr": err_lr, "recon": err_rec, "worse": worse,
                              "reverted": worse and rc.guard == "revert"})
        for j in idx:  # masks-only weights for the end-to-end check (streaming: on disk beside the output)
            if not run.store.keep_lr(j, snap[j]):
                state.lr_states[j] = snap[j]
        snap.clear()  # streaming: the files go
        del reference, snap
        guard.seconds += time.perf_counter() - tg
    state.recon_s += time.perf_counter() - t


def _verify(run: _Run, state: RunState, idx: list[int]) -> None:
    """Phase 4: check every linear of the window against its mask and sparsity; blocks back to the CPU."""
    scope = run.criterion.expected_scope()
    for j in idx:
        for name, linear in run.layout.block_linears(j).items():
            full = f"{run.prefix}.{j}.{name}"
            w = weight_matrix(linear)
            mask = state.masks[j][full].to(w.device)
            state.report.per_layer[full] = check_layer(
                full, w, mask, run.block_sparsity[j], expected_fraction(tuple(w.shape), run.block_sparsity[j], scope),
            )
        run.store.park(j)
        if j in state.dense:
            park(state.dense[j])


@torch.no_grad()
def _outlier_ratios(
    layout, captured: Captured, block0_inputs: torch.Tensor, rows: torch.Tensor, batch_size: int,
    device: torch.device, m: float, streams: StreamAllocator, store: InMemoryBlocks | StreamedBlocks,
    ranks: Ranks = Ranks(),
) -> list[float]:
    """Each block's OWL outlier ratio on the dense model's own activations (one pass over the blocks)."""
    stream = streams.like(block0_inputs)
    stream.copy_(block0_inputs)
    ratios = []
    for j in range(len(layout.blocks)):
        block = store.visit(j, device)
        linears = layout.block_linears(j)
        stats = collect_stats(
            block, layout.input_groups(j), linears, stream[: rows.numel()], lambda r, j=j: captured.kwargs_for(j, r),
            batch_size, device, False, ranks,
        )
        ratios.append(block_outlier_ratio(
            [weight_matrix(lin) for lin in linears.values()], [stats[name].sq_norms for name in linears], m,
        ))
        for acc in set(stats.values()):
            acc.free()
        propagate(block, j, captured, stream, device)
        store.leave(j)
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


def _end_to_end_streamed(store: StreamedBlocks, e2e: EndToEnd, guard: GuardReport, mode: str, device: torch.device,
                         ranks: Ranks = Ranks()) -> None:
    """:func:`_end_to_end` for a streamed run: both models walked block by block from what was written
    (the other ranks read what rank 0 committed, once it has: ``ranks`` are all of them)."""
    store.commit()
    ranks.barrier()
    final_src = store.written_source(device)
    final = e2e.measure(final_src.sm.model, final_src)
    lr_src = store.written_source(device, lr=True)
    lr = e2e.measure(lr_src.sm.model, lr_src)
    ranks.barrier()  # every rank has read both before rank 0 moves on to finish (and remove) the files
    worse = not final.kl <= lr.kl
    store.revert = worse and mode == "revert"
    guard.conclude(final, lr, store.revert, None)


@dataclass(frozen=True)
class _Made:
    """How many unit records, notes and guard verdicts the report held before a window: what the
    window added is what follows (block-parallel: what the owner hands to rank 0 with its blocks)."""

    units: int
    notes: int
    guard: int

    @staticmethod
    def of(state: RunState) -> "_Made":
        return _Made(len(state.report.units), len(state.report.notes), len(state.guard.windows) if state.guard else 0)


def _hand_over(run: _Run, state: RunState, idx: list[int], k: int, made: _Made, sending: list) -> None:
    """Block-parallel: the window's blocks go from the rank that reconstructed them to rank 0 as soon
    as they are final, with the window's unit records and guard verdict.

    Rank 0 then holds the reconstructed model up to the window, as a single process would: it can
    write the checkpoint after every window (a resume on the same number of ranks continues from
    it) and, with weights streamed from disk, write each block to the output shards when final.
    The owner goes on at once (the transfer completes in the background); the blocks' masks-only
    weights stay rank 0's copies for the sparse stream and the guard's end-to-end check.
    """
    ranks = run.ranks
    owner = idx[0] % ranks.world
    if owner == 0 or not (ranks.main or ranks.rank == owner):
        return
    tensors = [t for j in idx for t in run.blocks[j].state_dict().values()]
    if ranks.rank == owner:
        guard = state.guard.windows[made.guard:] if state.guard is not None else []
        sending += ranks.send(tensors, (state.report.units[made.units:], state.report.notes[made.notes:], guard), 0, k)
        return
    if state.guard is not None:
        for j in idx:
            if not run.store.keep_lr(j, state.lr_next[j]):
                state.lr_states[j] = state.lr_next[j]
    with torch.no_grad():
        units, notes, guard = ranks.receive(tensors, owner, k)
    for j in idx:
        linears = run.layout.block_linears(j)
        _check_still_pruned(j, owner, linears, {
            n: ~state.masks[j][f"{run.prefix}.{j}.{n}"].to(device=weight_matrix(m).device, dtype=torch.bool)
            for n, m in linears.items()})
    state.report.units += units
    state.report.notes += [n for n in notes if n not in state.report.notes]
    if state.guard is not None:
        state.guard.windows += guard


def _check_still_pruned(j: int, owner: int, linears: dict[str, nn.Module], pruned: dict[str, torch.Tensor]) -> None:
    """Block ``j``, received from rank ``owner``, must still be zero where this rank pruned it
    (``pruned``: a bool tensor per linear; every rank chose the same masks)."""
    for name, zero in pruned.items():
        if weight_matrix(linears[name])[zero].any():
            raise PrunekitError(f"block {j} came back from rank {owner} with pruned weights of {name} that are not zero")


def _gather_blocks(run: _Run, state: RunState) -> None:
    """Block-parallel: every rank receives the blocks the others reconstructed, and their records.

    Rank 0 received each block when it was final (:func:`_hand_over`); the others get them here, each
    from its owner (block ``j``: rank ``j % world``) in a broadcast per tensor, so all ranks end with
    the sequential run's model. Before that, the masks-only weights of the blocks a rank did not
    reconstruct are what it holds: they become its copies for the guard's end-to-end check. With
    weights streamed from disk rank 0 has written every block already, and no rank holds them.
    """
    ranks = run.ranks
    if state.guard is not None and not run.store.streamed:
        for j in range(len(run.blocks)):
            if not ranks.owns_block(j) and j not in state.lr_states:
                state.lr_states[j] = snapshot(run.blocks[j])
    for j in range(len(run.blocks) if not run.store.streamed else 0):
        owner = j % ranks.world
        linears = run.layout.block_linears(j)
        pruned = {n: weight_matrix(m) == 0 for n, m in linears.items()} if owner != ranks.rank else {}
        with torch.no_grad():
            for t in run.blocks[j].state_dict().values():
                ranks.broadcast_(t, owner)
        _check_still_pruned(j, owner, linears, pruned)
    report = state.report  # rank 0's records are every window's, in window order (a resumed rank's are too)
    report.units, report.notes, windows = ranks.broadcast_object(
        (report.units, report.notes, state.guard.windows if state.guard is not None else []))
    parts = ranks.gather_objects({"recon_s": state.recon_s, "guard_s": state.guard.seconds if state.guard is not None else 0.0})
    state.recon_s = max(p["recon_s"] for p in parts)  # ranks work at once: the longest one is the run's time
    if state.guard is not None:
        state.guard.windows = windows
        state.guard.seconds = max(p["guard_s"] for p in parts)


def _numel(model: nn.Module, name: str) -> int:
    return model.get_submodule(name).weight.numel()


@torch.no_grad()
def _apply(fn, inputs: torch.Tensor, batch_size: int, device: torch.device, allocate) -> torch.Tensor:
    """``fn`` over ``inputs`` batch by batch, into a new stream."""
    out = None
    for b in range(0, inputs.shape[0], batch_size):
        y = fn(inputs[b : b + batch_size].to(device))
        if out is None:
            out = allocate((inputs.shape[0], *y.shape[1:]), inputs.dtype)
        out[b : b + y.shape[0]] = y  # copy_: casts to the stream's dtype, crosses devices
    return out
