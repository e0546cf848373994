"""Activation streams: ``[windows, seq, hidden]`` tensors on the GPU, in RAM or memory-mapped from disk.

A 70B model calibrated on 256 windows of 1024 tokens has 8 GiB per float32 stream, and
reconstruction with global propagation keeps two streams plus a unit's inputs and targets. When
they would not fit comfortably in RAM, streams are backed by a file (``torch.from_file``) in a
temporary directory and paged in batch by batch; the rest of prunekit sees ordinary tensors.

Streams may be stored narrower than they are computed (``--stream-dtype bfloat16``): half the
memory, disk and checkpoint bytes. Writes round to the storage dtype (slice assignment casts); every
block and unit reads its input back in its weights' dtype (:func:`prunekit.precision.as_input`), so
computation stays in float32 (or under autocast).

On a CUDA run streams live in GPU memory when they fit (``auto`` and ``device``), as SparseGPT's
own code keeps its block inputs and outputs: every batch a block or a reconstruction step reads is
then already there. Measured on an H100 (bench/results/gpu/), host streams cost more than the
7B-shaped block's arithmetic, since every training step moves its inputs and targets over the bus.
Streams in RAM on a CUDA run are pinned (:mod:`prunekit.hostmem`).
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

import torch

from .config import OFFLOAD
from .hostmem import host_empty

log = logging.getLogger(__name__)

_RAM_FRACTION = 0.5  # streams may use at most this share of the available memory before going to disk
# streams may use at most this share of the GPU's free memory (measured when each is allocated): the
# rest is the window's blocks, their dense copies, AdamW state and a step's activations (a 7B block
# in BR+GP peaked at 6.8 GiB in bf16, 7.7 in fp32 on an H100: bench/results/gpu/)
_DEVICE_FRACTION = 0.4


def available_ram() -> int:
    """MemAvailable from /proc/meminfo (bytes); a large number where it cannot be read."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 1 << 50


def peak_rss_mb() -> float:
    """This process's peak resident memory so far, in MiB (``ru_maxrss``)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def device_free(device: torch.device) -> int:
    """Free memory of a CUDA ``device`` (bytes; 0 elsewhere)."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return 0
    return torch.cuda.mem_get_info(device)[0]


class StreamAllocator:
    """Allocates streams on the run's device, in RAM or on disk, following ``mode``: ``auto`` |
    ``device`` | ``ram`` | ``disk``.

    ``auto`` keeps streams on a CUDA ``device`` while ``copies`` streams of the requested size take
    at most 40% of its free memory, else in RAM while they take at most half of the available
    memory, else on disk (``copies`` counts the streams a run keeps at once). ``device`` on a CPU
    run is ``ram``. RAM streams of a CUDA run are pinned. A floating-point
    stream wider than ``dtype`` is stored as ``dtype`` (float32 -> bfloat16); a narrower one (a
    bfloat16 model's) keeps its own, so the default ``float32`` changes nothing.
    """

    def __init__(
        self, mode: str = "auto", directory: str | None = None, copies: int = 4, dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        if mode not in OFFLOAD:
            raise ValueError(f"unknown offload mode {mode!r}")
        self.mode = mode
        self.device = torch.device(device)
        self.copies = copies
        self.dtype = dtype
        self._dir: tempfile.TemporaryDirectory | None = None
        self._root = directory
        self._count = 0

    def on_device(self, nbytes: int) -> bool:
        if self.device.type != "cuda" or self.mode not in ("auto", "device"):
            return False
        return self.mode == "device" or nbytes * self.copies <= _DEVICE_FRACTION * device_free(self.device)

    def on_disk(self, nbytes: int) -> bool:
        if self.mode != "auto":
            return self.mode == "disk"
        return nbytes * self.copies > _RAM_FRACTION * available_ram()

    def storage(self, dtype: torch.dtype) -> torch.dtype:
        """The dtype a stream of ``dtype`` is stored in."""
        if dtype.is_floating_point and dtype.itemsize > self.dtype.itemsize:
            return self.dtype
        return dtype

    def empty(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        dtype = self.storage(dtype)
        numel = 1
        for s in shape:
            numel *= s
        nbytes = numel * torch.empty(0, dtype=dtype).element_size()
        if self.on_device(nbytes):
            return torch.empty(shape, dtype=dtype, device=self.device)
        if not self.on_disk(nbytes):
            return host_empty(shape, dtype, pin=self.device.type == "cuda")
        if self._dir is None:
            self._dir = tempfile.TemporaryDirectory(prefix="prunekit-streams-", dir=self._root)
            log.info("activation streams are memory-mapped under %s", self._dir.name)
        path = os.path.join(self._dir.name, f"stream{self._count}.bin")
        self._count += 1
        return torch.from_file(path, shared=True, size=numel, dtype=dtype).view(shape)

    def like(self, t: torch.Tensor) -> torch.Tensor:
        out = self.empty(tuple(t.shape), t.dtype)
        out.copy_(t)
        return out

    def close(self) -> None:
        if self._dir is not None:
            self._dir.cleanup()
            self._dir = None
