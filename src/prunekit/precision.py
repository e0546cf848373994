"""Numerical precision of a pruning run (``--precision``) and the storage dtype of its activation streams.

Modes:

- ``fp32``: float32 everywhere (prunekit's behaviour before this setting existed).
- ``tf32``: float32 tensors, with TF32 tensor-core matmuls allowed on a CUDA GPU in the regions
  below (``torch.backends.cuda.matmul.allow_tf32`` and ``torch.backends.cudnn.allow_tf32``, set on
  entry and restored on exit). TF32 exists only on NVIDIA GPUs: on a CPU ``tf32`` *is* ``fp32``
  and resolves to it, so the run records ``fp32``, what actually ran.
- ``bf16``: ``torch.autocast(device_type, dtype=torch.bfloat16)`` in the regions below, with
  float32 master weights (``reconstruct.fit`` trains float32 parameters), a float32 loss (a unit's
  output and targets are cast to float32 before the objective) and hence float32 AdamW state.
  Autocast also works on a CPU (oneDNN runs bf16 matmuls natively on AVX512-BF16/AMX cores).
- ``auto``: ``bf16`` on a CUDA device that supports it (``torch.cuda.is_bf16_supported()``),
  ``fp32`` elsewhere (a CPU's quality benchmark decides whether to change that).

Where the mode applies: every forward pass of a decoder block or of a reconstruction unit, that is
the training steps (the forward under autocast; the backward, the loss and the optimizer step under
TF32 when asked) **and** the forward-only passes: advancing the sparse and dense streams,
collecting the inputs the statistics are computed from, a unit's inputs and targets, the held-out
measurements inside ``fit`` and the guard's per-window errors. Why the forward-only passes too: on
a GPU a float32 matmul runs 8-16x slower than a bf16 one, and those passes add up to about as many
forward passes per block as a unit's whole training at the papers' 10 epochs (two streams
advanced, the statistics pass, the targets, before/after and per-epoch held-out measurements), so
keeping them in float32 would cost as much time as the training itself and undo most of the
speed-up. Their precision loss is bounded: streams are stored in ``--stream-dtype`` whatever the
mode and every block re-reads them in its weights' dtype, bf16 rounds the matmul inputs (float32
accumulation), and the statistics are accumulated exactly (below).

Exact regions (:func:`exact`, autocast and TF32 off): accumulating the input statistics (Wanda's
norms, SparseGPT's Hessian), always in float32 from the (possibly bf16-rounded) layer inputs. The
criteria themselves (SparseGPT's Cholesky and weight update), self-generated calibration text,
capturing block 0's inputs, the guard's end-to-end check through the LM head and the evaluation
run outside the mode altogether, in the model's dtype, so masks and the verdicts on the final model
do not depend on reduced precision beyond the statistics' inputs.

The mode is ambient, like ``torch.autocast`` itself: :func:`for_run` sets it for a call of
:func:`prunekit.prune` and :func:`forward`/:func:`step` read it where blocks and units run. That
keeps the mode out of the signatures of ``run_block``, ``propagate`` and ``fit``, which every
forward pass goes through anyway.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import logging
from contextvars import ContextVar
from typing import Any, Callable, Iterator

import torch
from torch import nn

from .errors import PrunekitError

log = logging.getLogger(__name__)

PRECISIONS = ("auto", "fp32", "tf32", "bf16")
STREAM_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}

_mode: ContextVar[str] = ContextVar("prunekit_precision", default="fp32")


def check(precision: str, stream_dtype: str) -> None:
    """Refuse unknown values with one line naming the choices."""
    if precision not in PRECISIONS:
        raise PrunekitError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    if stream_dtype not in STREAM_DTYPES:
        raise PrunekitError(f"unknown stream-dtype {stream_dtype!r}; choose one of {', '.join(STREAM_DTYPES)}")


def _device_type(device: torch.device | str) -> str:
    """The device type a setting means (``auto`` as :func:`prunekit.pipeline.resolve_device` resolves it)."""
    if isinstance(device, torch.device):
        return device.type
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return str(device).split(":")[0]


def resolve(precision: str, device: torch.device | str) -> str:
    """The mode that actually runs on ``device``: ``bf16``, ``tf32`` or ``fp32`` (never ``auto``).

    ``auto`` is bf16 on a CUDA GPU that supports it, else fp32; ``tf32`` off CUDA is fp32.
    """
    if precision not in PRECISIONS:
        raise PrunekitError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    kind = _device_type(device)
    cuda = kind == "cuda" and torch.cuda.is_available()
    if precision == "auto":
        return "bf16" if cuda and torch.cuda.is_bf16_supported() else "fp32"
    if precision == "tf32" and not cuda:
        return "fp32"
    return precision


def stream_dtype(name: str) -> torch.dtype:
    if name not in STREAM_DTYPES:
        raise PrunekitError(f"unknown stream-dtype {name!r}; choose one of {', '.join(STREAM_DTYPES)}")
    return STREAM_DTYPES[name]


def current() -> str:
    """The mode in force (``fp32`` outside a run)."""
    return _mode.get()


@contextlib.contextmanager
def use(mode: str) -> Iterator[None]:
    """Set the resolved ``mode`` for the enclosed code (restored on exit, also on errors)."""
    if mode not in PRECISIONS[1:]:
        raise ValueError(f"use() takes a resolved mode (fp32, tf32, bf16), not {mode!r}")
    token = _mode.set(mode)
    try:
        yield
    finally:
        _mode.reset(token)


@contextlib.contextmanager
def _tf32(allowed: bool) -> Iterator[None]:
    """Allow (or forbid) TF32 matmuls and convolutions, restoring both flags on exit."""
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = allowed
    torch.backends.cudnn.allow_tf32 = allowed
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = matmul
        torch.backends.cudnn.allow_tf32 = cudnn


def forward(device: torch.device | str) -> contextlib.AbstractContextManager:
    """The context of a forward pass on ``device`` in the current mode: autocast (bf16), TF32, or nothing."""
    mode = _mode.get()
    if mode == "bf16":
        return torch.autocast(_device_type(device), dtype=torch.bfloat16)
    if mode == "tf32" and _device_type(device) == "cuda":
        return _tf32(True)
    return contextlib.nullcontext()


def step(device: torch.device | str) -> contextlib.AbstractContextManager:
    """The context of a whole training step (forward, loss, backward, optimizer): TF32 when asked.

    bf16 needs nothing here: autocast belongs around the forward only (:func:`forward`); the
    backward runs each op in the dtype its forward used.
    """
    if _mode.get() == "tf32" and _device_type(device) == "cuda":
        return _tf32(True)
    return contextlib.nullcontext()


@contextlib.contextmanager
def exact(device: torch.device | str) -> Iterator[None]:
    """Plain float32 arithmetic inside a region that may be under autocast or TF32 (statistics)."""
    with torch.autocast(_device_type(device), enabled=False):
        if _device_type(device) == "cuda" and torch.backends.cuda.matmul.allow_tf32:
            with _tf32(False):
                yield
        else:
            yield


def as_input(x: torch.Tensor, module: nn.Module) -> torch.Tensor:
    """``x`` in the dtype of ``module``'s parameters: a bf16 stream read back for float32 weights.

    A no-op (no copy) when the dtypes already agree, as with float32 streams and weights.
    """
    p = next(module.parameters(), None)
    if p is None or not x.is_floating_point() or x.dtype == p.dtype:
        return x
    return x.to(p.dtype)


def computed(fn: Callable[[torch.Tensor], torch.Tensor], module: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """``fn`` (a unit's forward) reading its input in ``module``'s dtype, under the current mode."""

    def run(x: torch.Tensor) -> torch.Tensor:
        with forward(x.device):
            return fn(as_input(x, module))

    return run


def for_run(prune: Callable[..., Any]) -> Callable[..., Any]:
    """Decorate :func:`prunekit.prune` so that it runs in the mode its ``config`` resolves to.

    The mode is reset when the call ends, normally or not: evaluation and anything else after
    pruning runs as before.
    """
    signature = inspect.signature(prune)

    @functools.wraps(prune)
    def run(*args: Any, **kwargs: Any) -> Any:
        config = signature.bind(*args, **kwargs).arguments.get("config")
        if config is None:
            from .config import PruneConfig

            config = PruneConfig()
        check(config.precision, config.stream_dtype)
        mode = resolve(config.precision, config.device)
        if config.precision == "tf32" and mode != "tf32":
            log.info("TF32 exists only on CUDA GPUs; --precision tf32 runs as fp32 here")
        with use(mode):
            return prune(*args, **kwargs)

    return run
