"""The driver loop: calibrate, then walk the blocks in order, pruning each on the device.

The model stays on CPU. Block 0's inputs are captured once (:mod:`prunekit.capture`); then for each
block: move it to the device, run the calibration stream through it with hooks that accumulate the
statistics of every linear's input (one accumulator per group of linears sharing an input), let the
criterion choose masks (and, for SparseGPT, new kept weights), check every linear's sparsity, run
the stream through the pruned block so its outputs feed the next block, move the block back. This
is the layer-wise baseline of the papers ("LR"); magnitude needs no calibration pass at all.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from .capture import Captured, capture, propagate, run_block, to_device
from .config import CalibConfig, PruneConfig
from .criteria import InputStats, make_criterion
from .data import documents, sample_windows
from .errors import PrunekitError
from .families import discover, weight_matrix
from .masks import check_layer, expected_fraction
from .models import context_length
from .selfgen import self_calibration

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
    if calib.calib == "self":
        return self_calibration(
            model, tokenizer, calib.nsamples, calib.seqlen, calib.seed, calib.gen_batch_size, device, calib.cache_dir
        )
    docs = documents(calib.calib, calib.data_dir)
    return sample_windows(docs, tokenizer, calib.nsamples, calib.seqlen, calib.seed)


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

    def to_dict(self) -> dict:
        return asdict(self)


class _StatsDone(Exception):
    """Raised by the last statistics hook: nothing after the block's last linear input is needed."""


def collect_stats(
    block: nn.Module,
    index: int,
    groups: list[list[str]],
    linears: dict[str, nn.Module],
    captured: Captured,
    stream: torch.Tensor,
    device: torch.device,
    hessian: bool,
) -> dict[str, InputStats]:
    """Run the stream through ``block`` with hooks that accumulate each input group's statistics.

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
        for bi, sl in enumerate(captured.batches()):
            try:
                run_block(block, stream[sl].to(device), to_device(captured.kwargs[bi][index], device))
            except _StatsDone:
                pass
    finally:
        for h in handles:
            h.remove()
    return stats


@torch.no_grad()
def prune(
    model: nn.Module,
    tokenizer,
    config: PruneConfig | None = None,
    calib_ids: torch.Tensor | None = None,
    progress: bool = True,
) -> tuple[nn.Module, PruneReport]:
    """Prune ``model`` in place, block by block, and return it with a :class:`PruneReport`.

    ``calib_ids`` (``[n, seqlen]`` token ids) overrides the calibration data named in the config.
    """
    config = config or PruneConfig()
    sparsity = config.validate()
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
    )
    model.eval()
    captured = None
    stream = None
    if criterion.needs_inputs:
        t = time.perf_counter()
        if calib_ids is None:
            calib_ids = calibration_ids(model, tokenizer, config.calib, device)
        report.nsamples, report.seqlen = int(calib_ids.shape[0]), int(calib_ids.shape[1])
        report.timing["calib_s"] = time.perf_counter() - t
    else:
        report.notes.append("magnitude pruning uses no calibration data")
    t_prune = time.perf_counter()
    if criterion.needs_inputs:
        captured = capture(model, layout.blocks, calib_ids, config.batch_size, device, progress)
        stream = captured.hidden
    prefix = layout.family.blocks
    zeros = 0
    total = 0
    for i in tqdm(range(len(layout.blocks)), desc=f"pruning ({settings.method})", unit="block", disable=not progress):
        block = layout.blocks[i]
        block.to(device)
        linears = layout.block_linears(i)
        stats: dict[str, InputStats] = {}
        if captured is not None:
            stats = collect_stats(block, i, layout.input_groups(i), linears, captured, stream, device, criterion.needs_hessian)
        for name, linear in linears.items():
            w = weight_matrix(linear)
            new, mask = criterion.prune(w, stats.get(name))
            w.copy_(new)
            expected = expected_fraction(tuple(w.shape), sparsity, criterion.expected_scope())
            full = f"{prefix}.{i}.{name}"
            report.per_layer[full] = check_layer(full, w, mask, sparsity, expected)
            zeros += int((~mask).sum())
            total += mask.numel()
        for acc in set(stats.values()):
            acc.free()
        if captured is not None:
            propagate(block, i, captured, stream, device)
        block.to("cpu")
    report.timing["prune_s"] = time.perf_counter() - t_prune
    report.overall = zeros / max(total, 1)
    report.pruned_params = total
    if getattr(criterion, "dampings", None) and max(criterion.dampings) > settings.percdamp:
        report.notes.append(f"SparseGPT raised damping to {max(criterion.dampings):g} for some layers")
    return model, report
