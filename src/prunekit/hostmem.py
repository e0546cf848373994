"""Host <-> device transfers that do not dominate a GPU run.

Why this module exists: on an H100, a LLaMA-7B-shaped BR+GP run (bench/gpu.py, profile in
``bench/results/gpu/nvidia-h100-80gb-hbm3-2026-11-28/profile-wanda-brgp-bf16.txt``) spent 76% of
its GPU timeline copying device tensors into *pageable* host memory (``Module.to("cpu")`` of
blocks, the guard's whole-model moves, ``.to("cpu")`` of activations) and 19% copying pageable
memory to the device; the matmuls were 3%. A copy into pageable memory goes through a driver
staging buffer and first touches freshly mapped pages; a copy into page-locked ("pinned") memory is
one DMA at the bus's speed (the reason PyTorch's DataLoader has ``pin_memory``).

So every move between the host and a CUDA device goes through here:

- :func:`to_host` / :func:`park`: a tensor / a module's parameters and buffers to the host, into
  pinned memory when they come from a CUDA device;
- :func:`rows`: rows of a (host or device) stream gathered onto the device, through a pinned
  staging buffer and a non-blocking copy when the stream is on the host;
- :func:`host_empty`: an empty host tensor, pinned when a CUDA device will read or write it.
- :func:`return_freed_memory`: freed large buffers go straight back to the OS (runs that stream
  weights from disk, where host memory is the limit).

On a CPU-only run each function is the plain operation it replaces (``.to("cpu")``, ``t[idx]``,
``torch.empty``), so results there are unchanged bit for bit.

Cost: pinned memory cannot be swapped, and PyTorch's caching host allocator rounds a pinned block
up to a power of two and keeps freed blocks for reuse (``torch.cuda.host_memory_stats``), so host
memory for parked weights can grow up to 2x their size on a GPU run. The weights streamed from disk
(``--weights stream``) keep only a window of blocks on the host, which bounds it.
"""

from __future__ import annotations

import ctypes

import torch
from torch import nn


def _cuda(device: torch.device | str) -> bool:
    return torch.device(device).type == "cuda"


def host_empty(shape: tuple[int, ...], dtype: torch.dtype, pin: bool) -> torch.Tensor:
    """``torch.empty`` on the host, page-locked when ``pin`` (and a CUDA runtime is present)."""
    return torch.empty(shape, dtype=dtype, pin_memory=pin and torch.cuda.is_available())


def to_host(t: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``t.to("cpu", dtype)``; from a CUDA device, into pinned memory (one DMA, no page faults)."""
    if t.device.type == "cpu":
        return t if dtype is None or t.dtype == dtype else t.to(dtype)
    if not _cuda(t.device):  # another accelerator (MPS, XPU): the plain copy
        return t.to("cpu", dtype)
    if dtype is not None and dtype != t.dtype:
        t = t.to(dtype)  # convert on the device: the copy then moves the narrower bytes
    out = host_empty(tuple(t.shape), t.dtype, pin=True)
    out.copy_(t)
    return out


def host_copy(t: torch.Tensor) -> torch.Tensor:
    """A host copy of ``t`` that never aliases it (snapshots of weights that will keep changing)."""
    t = t.detach()
    return to_host(t) if _cuda(t.device) else t.to("cpu", copy=True)


@torch.no_grad()
def park(module: nn.Module) -> nn.Module:
    """``module.to("cpu")``, with the parameters and buffers that come from a CUDA device pinned."""
    if any(t.device.type != "cpu" for t in _tensors(module)):
        module._apply(to_host)  # what Module.to runs, with our copy (parameters keep their identity)
    return module


def _tensors(module: nn.Module):
    yield from module.parameters()
    yield from module.buffers()


def rows(t: torch.Tensor, idx: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """``t[idx].to(device)``: rows ``idx`` of a stream, on ``device``.

    From a host stream to a CUDA device the rows are gathered into a pinned staging buffer and
    copied without blocking (the caching host allocator keeps the buffer until the copy is done),
    so the gather of the next batch overlaps the transfer of this one."""
    device = torch.device(device)
    if t.device.type != "cpu":
        return t.index_select(0, idx.to(t.device)).to(device)
    if not _cuda(device):
        return t[idx].to(device)
    buf = host_empty((len(idx), *t.shape[1:]), t.dtype, pin=True)
    torch.index_select(t, 0, idx, out=buf)
    return buf.to(device, non_blocking=True)


_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter (malloc.h)


def return_freed_memory(threshold: int = 1 << 20) -> bool:
    """Make glibc give every freed buffer of ``threshold`` bytes or more back to the OS at once.

    glibc serves large allocations from their own mappings, but raises that threshold (up to 32 MiB)
    each time such a buffer is freed, after which buffers of a weight matrix's size come from the heap
    and stay in the process when freed. Measured on the streamed 1B benchmark: 0.32 GiB of resident
    memory above the live tensors at the training peak, 0.15 GiB with the threshold fixed at 1 MiB
    (bench/stream_memory.py). Called for runs that stream weights from disk, where host memory is
    the limit; a no-op (False) without glibc. The cost is a page fault per fresh page of a large buffer.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, int(threshold)))
    except (OSError, AttributeError):
        return False


def trim_heap() -> bool:
    """Give the free pages inside glibc's heaps back to the OS (``malloc_trim``); False without glibc.

    Buffers below the mmap threshold (activations of a batch, per-row statistics) are served from the
    heap, and freed ones leave holes that later, differently sized requests may not reuse. Measured on
    the streamed 1B benchmark (LR, 16 blocks): in some processes resident memory grew by about 35 MB a
    block this way (1.14 GiB of heap at the end instead of 0.47; which processes depends on the order
    Python's string hashing gives to sets, i.e. on PYTHONHASHSEED). Called once a block is final in
    runs that stream weights from disk; it costs milliseconds.
    """
    try:
        return bool(ctypes.CDLL("libc.so.6").malloc_trim(0))
    except (OSError, AttributeError):
        return False
