"""Runs on several processes with torch.distributed (launched by ``torchrun``): ranks and collectives.

prunekit scales out on torch.distributed, not on anything home-made: ``torchrun --nproc-per-node N
-m prunekit prune ...`` (with ``--nnodes`` and a rendezvous for several machines) starts N ranks;
they find each other through the environment torchrun sets (``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``MASTER_ADDR``/``MASTER_PORT``) and talk over NCCL on GPUs, gloo on CPUs.

Two modes (:func:`choose_mode`):

- **data-parallel** (any setting): the calibration windows are split across ranks; every reduction
  the single-process run makes over windows (Wanda's column norms, SparseGPT's Hessians, gradients,
  error sums, the guard's measures) becomes a sum over ranks (``all_reduce``), so every rank chooses
  the same masks and applies the same updates and the result is the single-process one up to the
  order of floating-point sums. Each rank holds only its windows' activation streams: N ranks hold
  N times the calibration data for the same memory per rank.
- **block-parallel** (settings whose units read the dense model's inputs and fit local targets,
  e.g. ``free-lunch``): units are independent of each other's reconstruction, so each rank
  reconstructs a disjoint set of blocks on all the windows and sends each to rank 0 as soon as it
  is final (:meth:`Ranks.send`, without waiting), so rank 0 checkpoints and writes the model as a
  single process does; the other ranks get every block at the end. Settings with
  sparse inputs or global targets (GP, CR) must see the blocks before them *reconstructed*, which is
  a chain over blocks: they stay sequential over blocks and use data parallelism instead.

A single process is a :class:`Ranks` of world size 1 whose collectives do nothing, so library code
calls them unconditionally and a single-process run is unchanged bit for bit.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import logging
import os
import re
import signal
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Iterator

import torch

from .config import units_are_independent
from .errors import PrunekitError

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT_MIN = 30.0  # a collective that waits longer than this ends the job (a rank died or hangs)


@dataclass
class Traffic:
    """What this process's collectives moved and waited (for metrics and the scaling benchmark).

    ``seconds`` is wall time inside collectives: transfer plus waiting for slower ranks.
    """

    all_reduce_bytes: int = 0
    all_reduce_calls: int = 0
    broadcast_bytes: int = 0
    sent_bytes: int = 0  # point to point (block-parallel: finished blocks to rank 0)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, float]:
        return dataclasses.asdict(self)


TRAFFIC = Traffic()  # this process's (one run per process under torchrun)


@dataclass(frozen=True)
class Ranks:
    """This process's place in the job and the collectives it takes part in (no-ops at world size 1)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    backend: str = "none"  # nccl | gloo | none

    @property
    def active(self) -> bool:
        """Part of a torchrun job (even of one process: ``--nproc-per-node 1`` runs the distributed
        path with its backend, which is how the NCCL path is checked on one GPU)."""
        return self.backend != "none"

    @property
    def main(self) -> bool:
        """Rank 0: the one that writes the output, checkpoints, logs and progress bars."""
        return self.rank == 0

    @property
    def comm_device(self) -> torch.device:
        return torch.device("cuda", torch.cuda.current_device()) if self.backend == "nccl" else torch.device("cpu")

    # --- collectives ---------------------------------------------------------------------------
    def all_reduce_(self, t: torch.Tensor) -> torch.Tensor:
        """Sum ``t`` over ranks, in place (moved to the backend's device and back when needed)."""
        self.all_reduce_many_([t])
        return t

    def all_reduce_many_(self, tensors: list[torch.Tensor]) -> None:
        """Sum each tensor over ranks, in place; the reductions run concurrently."""
        if not self.active:
            return
        import torch.distributed as dist

        t0 = time.perf_counter()
        TRAFFIC.all_reduce_calls += len(tensors)
        TRAFFIC.all_reduce_bytes += sum(t.numel() * t.element_size() for t in tensors)
        pending, copies = [], []
        for t in tensors:
            buf = t if t.device == self.comm_device else t.to(self.comm_device)
            copies.append((t, buf))
            pending.append(dist.all_reduce(buf, async_op=True))
        for work in pending:
            work.wait()
        for t, buf in copies:
            if buf is not t:
                t.copy_(buf)
        TRAFFIC.seconds += time.perf_counter() - t0

    def sum_floats(self, values: list[float]) -> list[float]:
        """``values`` summed over ranks (float64)."""
        if not self.active:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64)
        self.all_reduce_(t)
        return t.tolist()

    def broadcast_(self, t: torch.Tensor, src: int = 0) -> torch.Tensor:
        """Overwrite ``t`` on every rank with rank ``src``'s (same shape and dtype everywhere)."""
        if not self.active:
            return t
        import torch.distributed as dist

        t0 = time.perf_counter()
        TRAFFIC.broadcast_bytes += t.numel() * t.element_size()
        buf = t if t.device == self.comm_device else t.to(self.comm_device)
        dist.broadcast(buf, src)
        TRAFFIC.seconds += time.perf_counter() - t0
        if buf is not t:
            t.copy_(buf)
        return t

    def broadcast_object(self, obj: Any, src: int = 0) -> Any:
        if not self.active:
            return obj
        import torch.distributed as dist

        box = [obj if self.rank == src else None]
        dist.broadcast_object_list(box, src, device=self.comm_device)
        return box[0]

    def send(self, tensors: list[torch.Tensor], obj: Any, dst: int, tag: int) -> list[tuple[Any, torch.Tensor]]:
        """Start sending ``obj`` (pickled) and ``tensors`` to rank ``dst``; returns the pending sends.

        The sender goes on at once and may change ``tensors`` (they are copied: a block's weights are
        swapped for its masks-only ones while the streams pass it); the returned list holds the
        transfers and their buffers, and must be kept until :meth:`wait` says they are done. ``tag`` tells one message from
        the next between the same two ranks (the receiver passes the same one to :meth:`receive`).
        """
        import pickle

        import torch.distributed as dist

        data = torch.frombuffer(bytearray(pickle.dumps(obj)), dtype=torch.uint8)
        parts = [torch.tensor([data.numel()], dtype=torch.int64), data, *tensors]
        pending: list[tuple[Any, torch.Tensor]] = []
        for i, t in enumerate(parts):
            buf = t.detach().to(self.comm_device, copy=True).contiguous()  # a copy: the caller may change t at once
            TRAFFIC.sent_bytes += buf.numel() * buf.element_size()
            pending.append((dist.isend(buf, dst, tag=(tag << 12) + i), buf))
        return pending

    @staticmethod
    def wait(pending: list[Any]) -> None:
        """Wait until the transfers :meth:`send` started are done (their buffers may then go)."""
        t0 = time.perf_counter()
        for work, _ in pending:
            work.wait()
        pending.clear()
        TRAFFIC.seconds += time.perf_counter() - t0

    def receive(self, tensors: list[torch.Tensor], src: int, tag: int) -> Any:
        """Receive what rank ``src`` sent with :meth:`send` and the same ``tag``: ``tensors`` are
        overwritten in place (same shapes and dtypes as the sender's), the object is returned."""
        import pickle

        import torch.distributed as dist

        t0 = time.perf_counter()
        size = torch.zeros(1, dtype=torch.int64, device=self.comm_device)
        dist.recv(size, src, tag=tag << 12)
        data = torch.empty(int(size.item()), dtype=torch.uint8, device=self.comm_device)
        dist.recv(data, src, tag=(tag << 12) + 1)
        for i, t in enumerate(tensors):
            buf = t if t.device == self.comm_device and t.is_contiguous() else torch.empty(t.shape, dtype=t.dtype, device=self.comm_device)
            dist.recv(buf, src, tag=(tag << 12) + 2 + i)
            if buf is not t:
                t.copy_(buf)
        TRAFFIC.seconds += time.perf_counter() - t0
        return pickle.loads(data.cpu().numpy().tobytes())

    def gather_objects(self, obj: Any) -> list[Any]:
        """Every rank's ``obj``, in rank order, on every rank."""
        if not self.active:
            return [obj]
        import torch.distributed as dist

        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        if self.active:
            import torch.distributed as dist

            dist.barrier()

    def check_same(self, text: str, what: str) -> None:
        """Refuse to go on when ``text`` differs between ranks (settings, data, model weights)."""
        if not self.active:
            return
        digest = hashlib.sha256(text.encode()).hexdigest()[:16]
        digests = self.gather_objects(digest)
        differ = [r for r, d in enumerate(digests) if d != digests[0]]
        if differ:
            raise PrunekitError(
                f"{what} differ between ranks (rank 0 vs rank{'s' if len(differ) > 1 else ''} "
                f"{', '.join(map(str, differ))}); start every rank with the same command, model and data"
            )

    # --- how windows are split ---------------------------------------------------------------------
    def split(self, n: int) -> tuple[int, int]:
        """This rank's contiguous share ``[lo, hi)`` of ``n`` items (sizes differ by at most one)."""
        base, extra = divmod(n, self.world)
        lo = self.rank * base + min(self.rank, extra)
        return lo, lo + base + (1 if self.rank < extra else 0)

    def owns_block(self, j: int) -> bool:
        """Block-parallel: block ``j`` is reconstructed by rank ``j % world`` (round robin, so ranks finish together)."""
        return j % self.world == self.rank


def from_env() -> Ranks:
    """The ranks torchrun describes in the environment (world size 1 when not launched by it)."""
    if "WORLD_SIZE" not in os.environ and "RANK" not in os.environ:
        return Ranks()
    try:
        world = int(os.environ["WORLD_SIZE"])
        rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    except (KeyError, ValueError):
        raise PrunekitError("WORLD_SIZE and RANK must both be set (as torchrun sets them); start the processes with torchrun") from None
    return Ranks(rank, world, local, "nccl" if torch.cuda.is_available() else "gloo")


def init(ranks: Ranks, timeout_min: float = DEFAULT_TIMEOUT_MIN) -> Ranks:
    """Join the process group (once); a collective waiting longer than ``timeout_min`` raises instead of hanging.

    On GPUs each rank takes ``cuda:LOCAL_RANK``. gloo notices a peer whose process died at once (its
    socket closes); the timeout bounds the rest (a rank that hangs, a lost machine).
    """
    if not ranks.active:
        return ranks
    import torch.distributed as dist

    if ranks.backend == "nccl":
        if ranks.local_rank >= torch.cuda.device_count():
            raise PrunekitError(
                f"local rank {ranks.local_rank} has no GPU ({torch.cuda.device_count()} visible); "
                "start at most one process per GPU (torchrun --nproc-per-node)"
            )
        torch.cuda.set_device(ranks.local_rank)
    if not dist.is_initialized():
        _import_group_defaults()
        try:
            dist.init_process_group(ranks.backend, timeout=timedelta(minutes=timeout_min))
        except (RuntimeError, ValueError) as e:
            raise PrunekitError(f"could not join the torchrun job ({e}); check MASTER_ADDR/MASTER_PORT and that every rank started") from None
    return ranks


def _import_group_defaults() -> None:
    """Import, before the process group exists, the torch modules that bind ``group.WORLD`` as a default
    argument when they are first imported (``torch.distributed.nn.functional``, FSDP's grad scaler,
    ZeRO); transformers imports them with its models.

    Imported after ``init_process_group`` they would hold the group itself, so that
    ``destroy_process_group`` could not free it: gloo's threads then outlived it and were torn down
    while the interpreter exited, which now and then ended a finished rank with SIGABRT ("terminate
    called without an active exception") and failed the whole torchrun job. Imported first, they hold
    ``None``.
    """
    import torch.distributed.fsdp  # noqa: F401
    import torch.distributed.nn.functional  # noqa: F401
    import torch.distributed.optim  # noqa: F401


@contextlib.contextmanager
def failures(ranks: Ranks) -> Iterator[None]:
    """Turn the ways a torchrun job ends when a rank fails into one line each (a PrunekitError).

    A peer that dies makes this rank's next collective fail (gloo: the connection closes; NCCL: the
    watchdog or ``--dist-timeout``); torchrun's agent then stops the remaining ranks with SIGTERM,
    which becomes an error here too. Once this rank is failing, a later SIGTERM is ignored so that
    its one line is printed and the run directory is left as a failed run leaves it (torchrun
    waits for that before it kills).
    """
    if not ranks.active:
        yield
        return
    failing = False

    def stopped(_sig, _frame):
        if not failing:
            raise PrunekitError(f"rank {ranks.rank} was stopped by torchrun: another rank of the job failed (see its error)")

    previous = signal.signal(signal.SIGTERM, stopped)
    try:
        yield
    except PrunekitError:
        failing = True
        raise
    except (RuntimeError, ValueError) as e:  # DistBackendError, DistNetworkError, timeouts are RuntimeErrors
        failing = True
        text = str(e)
        if not any(k in text for k in ("gloo", "Gloo", "NCCL", "nccl", "Connection", "connection", "Timed out", "timed out", "peer")):
            raise
        first = text.strip().splitlines()[0] if text.strip() else type(e).__name__
        first = re.sub(r"^\[[^\]]*\]\s*", "", first).split(". This is typically")[0][:200]  # gloo's source location and advice
        raise PrunekitError(
            f"rank {ranks.rank} lost the other ranks ({first}): a rank failed, was killed or hangs; "
            "see the first error, then rerun the job (or resume it with --resume)"
        ) from None
    except BaseException:
        failing = True
        raise
    finally:
        if not failing:
            signal.signal(signal.SIGTERM, previous)


def shutdown(ranks: Ranks) -> None:
    """Leave the process group, every rank together (a barrier first: no rank closes its connections
    while another may still use them). Every rank calls this at the same point of the job, after
    pruning, so the barrier costs one round trip. The group is freed here, while the interpreter is
    whole (see :func:`_import_group_defaults`)."""
    if ranks.active:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()


def device_for(ranks: Ranks, setting: str) -> str:
    """``--device auto`` on several GPU ranks means each rank's own GPU."""
    if ranks.active and ranks.backend == "nccl" and setting in ("auto", "cuda"):
        return f"cuda:{ranks.local_rank}"
    return setting


def choose_mode(setting: str, inputs: str, targets: str, window: int, trains: bool, ranks: Ranks) -> str:
    """``data`` or ``block`` (see the module docstring) for a validated ``--parallel`` ``setting``;
    ``auto`` takes block-parallel where units are independent (:func:`prunekit.config.units_are_independent`)."""
    independent = units_are_independent(inputs, targets, window, trains)
    if setting == "block" and not independent:
        raise PrunekitError(
            "--parallel block needs units that read the dense model's inputs and fit local targets, one block per window "
            "(e.g. --recon free-lunch); sparse inputs or global targets chain the blocks: use --parallel data"
        )
    if not ranks.active:
        return "single"
    if setting == "auto":
        return "block" if independent else "data"
    return setting


def weights_digest(module: torch.nn.Module) -> str:
    """A cheap fingerprint of a module's weights (sums per tensor), to check that ranks agree."""
    parts = [f"{k}:{float(v.detach().double().sum()):.17g}:{float(v.detach().double().abs().sum()):.17g}"
             for k, v in module.state_dict().items()]
    return ";".join(parts)
