"""Device benchmark (issue 12): reconstruction speed and memory of a LLaMA-7B-shaped model on one device.

Protocol "gpu-bench-v1". A Llama with LLaMA-7B's block shape (hidden 4096, MLP 11008, 32 heads,
vocabulary 32000) but only 2 blocks, with random weights built in the process
(``LlamaConfig`` + ``AutoModelForCausalLM.from_config``: nothing to download or carry), is pruned
through prunekit's public API (``prunekit.prune(model, None, PruneConfig, calib_ids=...)``) on
random calibration ids: 64 windows of 1024 tokens, 10% held out, batch 8, Wanda/SparseGPT at 50%.
Configurations, each from the same dense weights:

- ``wanda-brgp-{fp32,tf32,bf16}`` and ``wanda-brgp-bf16-streams``: Wanda masks + BR+GP for 1 epoch
  at batch 8 (the Rethinking paper's block-wise reconstruction with global propagation), in each
  ``--precision``; the last one also stores the activation streams in bfloat16 (``--stream-dtype``);
  streams go where ``--offload auto`` puts them (on a GPU with room: GPU memory);
- ``wanda-brgp-bf16-hoststreams``: as ``wanda-brgp-bf16`` with the streams in (pinned) host memory
  (``--offload ram``), the low-GPU-memory path;
- ``wanda-lr-*`` and ``sparsegpt-lr-*``: masks only (the papers' layer-wise baseline), in each precision.

For each: wall time per block (block 0 also captures the inputs and takes the guard's dense
reference; the steady figure is the mean of the later blocks), reconstruction training TFLOP/s as
prunekit counts it (``UnitRecord.flops / seconds``: the linears' forward + backward FLOPs, attention
scores not counted) and its ratio to bf16, fp32 and tf32 square matmuls timed in the same process
(8192-square on a GPU), the time per gradient step and the part of it not explained by matmuls at
that rate (overhead), peak GPU memory (``torch.cuda.max_memory_allocated``, reset before each
configuration) and peak host RSS (``VmHWM``, reset through ``/proc/self/clear_refs``), and a
**projection** (not a measurement) to 32 blocks at the Rethinking paper's sizes (256 windows x 1024
tokens, 10 epochs, batch 8: 320 gradient steps per block): measured per-step time x steps, plus the
measured non-training time per block scaled by the number of calibration tokens.

``--default-model`` adds the default model's shape (SmolLM2-135M: hidden 576, 9 heads / 3 KV heads,
MLP 1536, tied 49152 vocabulary) with random weights at the paper's sizes (256 x 1024 tokens,
batch 8; ``--default-blocks`` of its 30 blocks, 1 epoch) to measure the per-step overhead of a
small block, where the step time is launch and Python overhead rather than arithmetic.

``--budget-s`` skips the configurations that would not fit in the remaining time (estimated from the
longest run of the same kind so far) and stops a run that overshoots (after a block); skipped and
stopped configurations are recorded. Results are written after every configuration, so a run
killed from outside still leaves what it finished.

    PYTHONPATH=src python bench/gpu.py                   # the GPU run (see bench/gpu_device.sh)
    PYTHONPATH=src python bench/gpu.py --shape small     # on a CPU in about 2 minutes (it stays working)

Writes ``gpu.json`` (everything) and ``gpu.md`` (a table) into ``--out`` (default
``bench/results/gpu/<machine>-<date>[-<shape>]``).
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import logging
import math
import os
import platform
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

import prunekit
from prunekit import precision as pk_precision
from prunekit.config import PruneConfig

HERE = Path(__file__).resolve().parent
PROTOCOL = "gpu-bench-v1"
MODES = ("fp32", "tf32", "bf16")

# The Rethinking paper's sizes (Appendix A): 256 windows of 1024 tokens, 10 epochs, batch 8. The
# paper trains on all 256 windows: 32 steps per epoch, 320 per block.
PAPER = {"windows": 256, "seqlen": 1024, "epochs": 10, "batch_size": 8}


@dataclass(frozen=True)
class Shape:
    """A Llama model shape and the calibration sizes it is benchmarked at."""

    hidden: int
    mlp: int
    heads: int
    kv_heads: int
    blocks: int
    vocab: int
    windows: int
    seqlen: int
    tied: bool = False
    project_blocks: int = 32  # the whole model the per-block figures are projected to

    def llama_config(self):
        from transformers import LlamaConfig

        return LlamaConfig(
            vocab_size=self.vocab, hidden_size=self.hidden, intermediate_size=self.mlp,
            num_hidden_layers=self.blocks, num_attention_heads=self.heads, num_key_value_heads=self.kv_heads,
            max_position_embeddings=max(2048, self.seqlen), tie_word_embeddings=self.tied,
            rms_norm_eps=1e-5,
        )


# --shape: the LLaMA-7B block (the GPU run), and two scaled-down ones that run on a CPU
SHAPES = {
    "7b": Shape(hidden=4096, mlp=11008, heads=32, kv_heads=32, blocks=2, vocab=32000, windows=64, seqlen=1024),
    "small": Shape(hidden=256, mlp=688, heads=4, kv_heads=4, blocks=2, vocab=1024, windows=8, seqlen=128),
    "tiny": Shape(hidden=64, mlp=172, heads=4, kv_heads=4, blocks=2, vocab=256, windows=4, seqlen=32),
}
# --default-model: SmolLM2-135M's shape (30 blocks; --default-blocks of them are built), per --shape
DEFAULT_MODEL = {
    "7b": Shape(hidden=576, mlp=1536, heads=9, kv_heads=3, blocks=8, vocab=49152, windows=256, seqlen=1024,
                tied=True, project_blocks=30),
    "small": Shape(hidden=576, mlp=1536, heads=9, kv_heads=3, blocks=2, vocab=49152, windows=16, seqlen=128,
                   tied=True, project_blocks=30),
    "tiny": Shape(hidden=576, mlp=1536, heads=9, kv_heads=3, blocks=1, vocab=512, windows=4, seqlen=32,
                  tied=True, project_blocks=30),
}
MATMUL_SIZE = {"cuda": 8192, "cpu": {"7b": 2048, "small": 512, "tiny": 128}}


@dataclass(frozen=True)
class RunSpec:
    """One benchmarked configuration: a criterion, LR or BR+GP, a precision, a stream dtype."""

    name: str
    method: str
    recon: str  # lr | br-gp
    precision: str
    stream_dtype: str = "float32"
    offload: str = "auto"  # where the activation streams go (--offload)

    @property
    def kind(self) -> str:
        """Runs of one kind take about the same time (the budget's estimate)."""
        return f"{self.method}-{self.recon}"


def specs() -> list[RunSpec]:
    """BR+GP first (the issue's targets), then the masks-only baselines."""
    out = [RunSpec(f"wanda-brgp-{m}", "wanda", "br-gp", m) for m in MODES]
    out.append(RunSpec("wanda-brgp-bf16-streams", "wanda", "br-gp", "bf16", "bfloat16"))
    out.append(RunSpec("wanda-brgp-bf16-hoststreams", "wanda", "br-gp", "bf16", offload="ram"))
    out += [RunSpec(f"wanda-lr-{m}", "wanda", "lr", m) for m in MODES]
    out += [RunSpec(f"sparsegpt-lr-{m}", "sparsegpt", "lr", m) for m in MODES]
    return out


# ----------------------------------------------------------------------------- measurements


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_tflops(device: torch.device, size: int, seconds: float, mode: str) -> float | None:
    """TFLOP/s of ``size``-square matmuls in ``mode`` (bf16 tensors; fp32 with TF32 off; fp32 with
    TF32 on), timed with a synchronisation after every batch of products. None for tf32 off CUDA."""
    if mode == "tf32" and device.type != "cuda":
        return None
    dtype = torch.bfloat16 if mode == "bf16" else torch.float32
    a = torch.randn(size, size, device=device, dtype=dtype)  # random data: zeros would run faster
    b = torch.randn(size, size, device=device, dtype=dtype)
    c = torch.empty(size, size, device=device, dtype=dtype)
    flags = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = mode == "tf32"
    try:
        for _ in range(3):
            torch.matmul(a, b, out=c)
        sync(device)
        per_batch = 10 if device.type == "cuda" else 1
        n = 0
        t = time.perf_counter()
        while True:
            for _ in range(per_batch):
                torch.matmul(a, b, out=c)
            sync(device)
            n += per_batch
            elapsed = time.perf_counter() - t
            if elapsed >= seconds:
                break
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = flags
    del a, b, c
    return 2.0 * size**3 * n / elapsed / 1e12


def matmul_rates(device: torch.device, size: int, seconds: float) -> dict[str, float | None]:
    return {mode: matmul_tflops(device, size, seconds, mode) for mode in MODES}


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) of this process; False where that is not allowed."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_rss_bytes() -> int | None:
    """VmHWM (peak resident set since the last reset) from /proc/self/status; ru_maxrss elsewhere."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        import resource

        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024
    except (ImportError, OSError):
        return None


def machine_info(device: torch.device) -> dict[str, Any]:
    import transformers

    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    info: dict[str, Any] = {
        "device": str(device),
        "gpu": gpu,
        "gpu_memory_bytes": torch.cuda.get_device_properties(device).total_memory if gpu else None,
        "cuda": torch.version.cuda,
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "prunekit_commit": prunekit_commit(),
    }
    return info


def prunekit_commit() -> str:
    """``$PRUNEKIT_COMMIT`` when the caller passed it (the tree travelled to a lent machine, whose copy
    may carry a stale ``.git``: on 2026-11-28 a second call there reported the first call's commit
    with ``-dirty``); else the checkout's commit (``-dirty`` with uncommitted changes to tracked files)."""
    if os.environ.get("PRUNEKIT_COMMIT"):
        return os.environ["PRUNEKIT_COMMIT"]
    root = HERE.parent
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
        return head + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return os.environ.get("PRUNEKIT_COMMIT", "unknown")


def machine_slug(info: dict[str, Any]) -> str:
    name = info["gpu"] or "cpu"
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


# ----------------------------------------------------------------------------- one configuration


class _OverBudget(Exception):
    """Raised from the window callback to stop a run that overshoots the time budget."""


def build_model(shape: Shape, seed: int = 0) -> torch.nn.Module:
    """A float32 Llama of ``shape`` with random weights (transformers' own initialisation), on the CPU."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(shape.llama_config())
    return model.float().eval()


def calib_ids(shape: Shape, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, shape.vocab, (shape.windows, shape.seqlen), generator=gen)


def prune_config(spec: RunSpec, device: str, batch_size: int, epochs: int) -> PruneConfig:
    cfg = PruneConfig(batch_size=batch_size, device=device, precision=spec.precision, stream_dtype=spec.stream_dtype,
                      offload=spec.offload)
    cfg.sparsity.method = spec.method
    cfg.sparsity.sparsity = "0.5"
    cfg.recon.recon = spec.recon
    if spec.recon != "lr":
        cfg.recon.epochs = epochs
    return cfg


def run_one(
    spec: RunSpec, model: torch.nn.Module, ids: torch.Tensor, shape: Shape, device: torch.device, batch_size: int,
    epochs: int, rates: dict[str, float | None], deadline: float | None,
) -> dict[str, Any]:
    """Prune ``model`` (dense weights on entry) with ``spec``; time, memory and throughput figures."""
    cfg = prune_config(spec, str(device), batch_size, epochs)
    mode = pk_precision.resolve(spec.precision, device)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    rss_reset = reset_peak_rss()
    marks: list[float] = []

    def on_window(_k: int) -> None:
        marks.append(time.perf_counter())
        if deadline is not None and marks[-1] > deadline and len(marks) < shape.blocks:
            raise _OverBudget

    out: dict[str, Any] = {
        "name": spec.name, "method": spec.method, "recon": spec.recon, "precision": spec.precision,
        "precision_resolved": mode, "stream_dtype": spec.stream_dtype, "offload": spec.offload,
        "epochs": epochs if spec.recon != "lr" else 0, "batch_size": batch_size,
    }
    t0 = time.perf_counter()
    report = None
    try:
        _, report = prunekit.prune(model, None, cfg, calib_ids=ids, progress=False, on_window=on_window)
        out["status"] = "done"
    except _OverBudget:
        out["status"] = "stopped"
        out["why"] = f"over the time budget after {len(marks)} of {shape.blocks} blocks"
    except Exception as e:  # an out-of-memory or a failure of one configuration must not lose the others
        out["status"] = "failed"
        out["why"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:500]
        logging.exception("%s failed", spec.name)
    if report is None:  # a run stopped half-way may leave blocks (or the whole model) on the device
        model.to("cpu")
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    try:
        sync(device)
    except RuntimeError as e:  # a broken CUDA context: record it, keep what the earlier runs wrote
        out["status"], out["why"] = "failed", f"{out.get('why', '')} (sync: {str(e).splitlines()[0]})"[:500]
    end = time.perf_counter()
    out["wall_s"] = end - t0
    starts = [t0] + marks[:-1]
    out["per_block_s"] = [m - s for s, m in zip(starts, marks)]
    later = out["per_block_s"][1:] or out["per_block_s"]
    out["steady_block_s"] = sum(later) / len(later) if later else None
    out["after_blocks_s"] = end - marks[-1] if marks and report is not None else None  # the guard's end-to-end check
    out["peak_gpu_bytes"] = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    out["peak_gpu_reserved_bytes"] = torch.cuda.max_memory_reserved(device) if device.type == "cuda" else None
    out["peak_rss_bytes"] = peak_rss_bytes()
    out["peak_rss_scope"] = "configuration" if rss_reset else "process"
    if report is not None:
        out.update(throughput(report, rates, mode))
        out["timing"] = dict(report.timing)
        out["overall_sparsity"] = report.overall
        out["guard"] = report.guard.summary if report.guard is not None else None
        out["notes"] = list(report.notes)
        out["projection"] = projection(out, shape, spec, mode, rates)
    return out


def throughput(report, rates: dict[str, float | None], mode: str) -> dict[str, Any]:
    """Training TFLOP/s as prunekit counts it, its ratios to the matmul rates, step time and overhead."""
    units = [u for u in report.units if u.steps]
    if not units:
        return {"steps": 0}
    seconds = sum(u.seconds for u in units)
    flops = sum(u.flops for u in units)
    tflops = flops / max(seconds, 1e-12) / 1e12
    last = units[-1]  # the steady state: later blocks pay no first-call costs
    step_s = last.seconds / last.steps
    rate = rates.get(mode)
    out: dict[str, Any] = {
        "steps": sum(u.steps for u in units),
        "train_s": seconds,
        "train_tflops": tflops,
        "ratio_to_matmul": {m: (tflops / r if r else None) for m, r in rates.items()},
        "ratio_to_same_precision_matmul": tflops / rate if rate else None,
        "last_unit": {"unit": last.unit, "steps": last.steps, "seconds": last.seconds, "flops": last.flops},
        "step_s": step_s,
        # time not explained by the counted FLOPs at the same-precision matmul rate (launches, Python,
        # elementwise work, attention scores, host-device copies, the per-epoch held-out check)
        "overhead_per_step_s": (last.seconds - last.flops / (rate * 1e12)) / last.steps if rate else None,
    }
    return out


def projection(run: dict[str, Any], shape: Shape, spec: RunSpec, mode: str, rates: dict[str, float | None]) -> dict[str, Any] | None:
    """PROJECTED (not measured) time for ``shape.project_blocks`` blocks at the paper's sizes.

    Training: the measured time per gradient step (of ``batch`` windows of ``seqlen`` tokens, scaled
    by the tokens per step when the measured windows are shorter) x 320 steps per block. The rest of
    a block's time (forward passes over all windows: streams, statistics, inputs and targets, the
    guard; SparseGPT's solve) x the ratio of calibration tokens; for masks-only runs this is an upper
    bound, since SparseGPT's solve does not grow with the windows.
    """
    block_s = run.get("steady_block_s")
    if block_s is None or (spec.recon != "lr" and "last_unit" not in run):
        return None
    tokens_ratio = PAPER["windows"] * PAPER["seqlen"] / (shape.windows * shape.seqlen)
    out: dict[str, Any] = {
        "what": (f"PROJECTION, not a measurement: {shape.project_blocks} blocks of hidden {shape.hidden} / MLP {shape.mlp} "
                 f"at {PAPER['windows']} windows x "
                 f"{PAPER['seqlen']} tokens" + (f", {PAPER['epochs']} epochs, batch {PAPER['batch_size']}" if spec.recon != 'lr' else '')
                 + ", scaled from the measured per-block and per-step times"),
        "blocks": shape.project_blocks, **PAPER,
    }
    if spec.recon == "lr":
        out["total_s"] = shape.project_blocks * block_s * tokens_ratio
    else:
        train_block = run["last_unit"]["seconds"]
        steps = math.ceil(PAPER["windows"] / PAPER["batch_size"]) * PAPER["epochs"]
        step_s = run["step_s"] * PAPER["seqlen"] / shape.seqlen
        other = max(block_s - train_block, 0.0) * tokens_ratio
        out.update(steps_per_block=steps, step_s=step_s, train_s=shape.project_blocks * steps * step_s,
                   other_s=shape.project_blocks * other)
        out["total_s"] = out["train_s"] + out["other_s"]
    out["total_min"] = out["total_s"] / 60
    return out


# ----------------------------------------------------------------------------- the benchmark


@dataclass
class Budget:
    """Seconds left for the whole benchmark; estimates a run from the longest one of its kind so far."""

    seconds: float | None
    start: float = field(default_factory=time.perf_counter)
    taken: dict[str, float] = field(default_factory=dict)

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def deadline(self) -> float | None:
        return None if self.seconds is None else self.start + self.seconds

    def estimate(self, kind: str) -> float:
        if kind in self.taken:
            return self.taken[kind]
        return max(self.taken.values(), default=0.0)

    def fits(self, kind: str, floor: float = 0.0) -> bool:
        if self.seconds is None:
            return True
        return self.elapsed() + max(self.estimate(kind), floor) <= self.seconds

    def record(self, kind: str, seconds: float) -> None:
        self.taken[kind] = max(self.taken.get(kind, 0.0), seconds)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=sorted(SHAPES), default="7b", help="model shape and calibration sizes (default 7b)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--windows", type=int, help="calibration windows (default: the shape's; 64 for 7b)")
    p.add_argument("--seqlen", type=int, help="tokens per window (default: the shape's; 1024 for 7b)")
    p.add_argument("--blocks", type=int, help="decoder blocks built (default 2)")
    p.add_argument("--vocab", type=int, help="vocabulary size (default: the shape's; 32000 for 7b)")
    p.add_argument("--batch-size", type=int, default=8, help="windows per forward pass and gradient step (default 8)")
    p.add_argument("--epochs", type=int, default=1, help="BR+GP epochs (default 1)")
    p.add_argument("--configs", default="", help="comma-separated configuration names to run (default: all): "
                   + ", ".join(s.name for s in specs()))
    p.add_argument("--default-model", action="store_true", help="also the default model's shape at the paper's sizes")
    p.add_argument("--default-blocks", type=int, help="blocks of the default model's shape built (default 8 for 7b)")
    p.add_argument("--default-windows", type=int, help="calibration windows for the default model's shape (default 256 for 7b)")
    p.add_argument("--default-precisions", default="bf16,fp32", help="precisions of the default-model runs (default bf16,fp32)")
    p.add_argument("--matmul-size", type=int, help="side of the square matmuls (default 8192 on a GPU)")
    p.add_argument("--matmul-seconds", type=float, help="seconds per matmul measurement (default 1 on a GPU)")
    p.add_argument("--budget-s", type=float, help="time budget in seconds; configurations that would not fit are skipped")
    p.add_argument("--out", help="output directory (default bench/results/gpu/<machine>-<date>[-<shape>])")
    p.add_argument("--out-parent", default=str(HERE / "results" / "gpu"), help="where the default output directory goes")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--render", metavar="GPU_JSON", help="only rewrite gpu.md beside an existing gpu.json (after a change to the table)")
    return p.parse_args(argv)


def resolved_shape(base: Shape, **overrides: int | None) -> Shape:
    values = {k: v for k, v in overrides.items() if v is not None}
    return Shape(**{**base.__dict__, **values})


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.render:
        done = json.loads(Path(args.render).read_text())
        write(Path(args.render).parent, done)
        return done
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    budget = Budget(args.budget_s)
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    shape = resolved_shape(SHAPES[args.shape], windows=args.windows, seqlen=args.seqlen, blocks=args.blocks, vocab=args.vocab)
    info = machine_info(device)
    date = dt.date.today().isoformat()
    out_dir = Path(args.out) if args.out else Path(args.out_parent) / (
        f"{machine_slug(info)}-{date}" + ("" if args.shape == "7b" else f"-{args.shape}")
    )
    size = args.matmul_size or (MATMUL_SIZE["cuda"] if device.type == "cuda" else MATMUL_SIZE["cpu"][args.shape])
    seconds = args.matmul_seconds if args.matmul_seconds is not None else (1.0 if device.type == "cuda" or args.shape == "7b" else 0.2 if args.shape == "small" else 0.05)
    wanted = [s.strip() for s in args.configs.split(",") if s.strip()]
    all_specs = specs()
    unknown = sorted(set(wanted) - {s.name for s in all_specs})
    if unknown:
        raise SystemExit(f"unknown configuration(s) {', '.join(unknown)}; choose from {', '.join(s.name for s in all_specs)}")
    chosen = [s for s in all_specs if not wanted or s.name in wanted]

    result: dict[str, Any] = {
        "protocol": PROTOCOL,
        "date": date,
        "machine": info,
        "shape": {"name": args.shape, **shape.__dict__},
        "sizes": {"windows": shape.windows, "seqlen": shape.seqlen, "holdout": 0.1, "batch_size": args.batch_size,
                  "epochs": args.epochs, "sparsity": "0.5", "seed": args.seed},
        "paper_sizes": PAPER,
        "note": ("Every 'projection' entry is a PROJECTION from the measured per-block and per-step times, not a "
                 "measurement; everything else is measured in this process."),
        "budget_s": args.budget_s,
        "matmul": {"size": size, "seconds": seconds, "before": None, "after": None},
        "configs": [],
        "skipped": [],
        "default_model": None,
    }

    def save() -> None:
        result["elapsed_s"] = budget.elapsed()
        write(out_dir, result)

    print(f"[gpu-bench] {info['gpu'] or 'CPU'} | torch {info['torch']} | transformers {info['transformers']} | "
          f"prunekit {info['prunekit_commit']} | out {out_dir}", flush=True)
    rates = matmul_rates(device, size, seconds)
    result["matmul"]["before"] = rates
    print(f"[gpu-bench] matmul {size}^2 TFLOP/s: {fmt_rates(rates)}", flush=True)

    t = time.perf_counter()
    model = build_model(shape, args.seed)
    dense = {k: v.detach().clone() for k, v in model.state_dict().items()}
    ids = calib_ids(shape, args.seed)
    result["build_s"] = time.perf_counter() - t
    save()

    for spec in chosen:
        if not budget.fits(spec.kind):
            result["skipped"].append({"name": spec.name, "why": f"time budget: {budget.elapsed():.0f} s of "
                                      f"{args.budget_s:.0f} s used, a {spec.kind} run takes about {budget.estimate(spec.kind):.0f} s"})
            print(f"[gpu-bench] skip {spec.name} (budget)", flush=True)
            save()
            continue
        model.load_state_dict(dense)
        run = run_one(spec, model, ids, shape, device, args.batch_size, args.epochs, rates, budget.deadline())
        budget.record(spec.kind, run["wall_s"])
        result["configs"].append(run)
        print(f"[gpu-bench] {summary_line(run)}", flush=True)
        save()
    del model, dense
    gc.collect()

    if args.default_model:
        result["default_model"] = default_model_runs(args, device, rates, budget, result, save)

    result["matmul"]["after"] = matmul_rates(device, size, seconds)
    save()
    print(markdown(result), flush=True)
    print(f"[gpu-bench] wrote {out_dir / 'gpu.json'} and {out_dir / 'gpu.md'}", flush=True)
    return result


def default_model_runs(args, device, rates, budget: Budget, result: dict[str, Any], save: Callable[[], None]) -> dict[str, Any]:
    """BR+GP on SmolLM2-135M's shape with random weights at the paper's sizes: the per-step overhead of a small block."""
    shape = resolved_shape(DEFAULT_MODEL[args.shape], blocks=args.default_blocks, windows=args.default_windows)
    out: dict[str, Any] = {"shape": shape.__dict__, "runs": [], "skipped": []}
    modes = [m.strip() for m in args.default_precisions.split(",") if m.strip()]
    # no run of this kind has been timed yet: ask for a minute at least (a 7B BR+GP run says nothing about it)
    floor = 60.0 if args.shape == "7b" else 0.0
    if not budget.fits("default-br-gp", floor):
        out["skipped"] = [{"name": f"default-brgp-{m}", "why": "time budget"} for m in modes]
        result["skipped"] += out["skipped"]
        return out
    t = time.perf_counter()
    model = build_model(shape, args.seed)
    dense = {k: v.detach().clone() for k, v in model.state_dict().items()}
    ids = calib_ids(shape, args.seed)
    out["build_s"] = time.perf_counter() - t
    result["default_model"] = out
    for mode in modes:
        spec = RunSpec(f"default-brgp-{mode}", "wanda", "br-gp", mode)
        if not budget.fits("default-br-gp", floor):
            out["skipped"].append({"name": spec.name, "why": "time budget"})
            result["skipped"].append(out["skipped"][-1])
            continue
        model.load_state_dict(dense)
        run = run_one(spec, model, ids, shape, device, args.batch_size, args.epochs, rates, budget.deadline())
        budget.record("default-br-gp", run["wall_s"])
        out["runs"].append(run)
        print(f"[gpu-bench] {summary_line(run)}", flush=True)
        save()
    return out


# ----------------------------------------------------------------------------- output


def fmt_rates(rates: dict[str, float | None]) -> str:
    return ", ".join(f"{m} {r:.3g}" if r else f"{m} -" for m, r in rates.items())


def summary_line(run: dict[str, Any]) -> str:
    parts = [run["name"], run["status"], f"{run['wall_s']:.1f} s"]
    if run.get("steady_block_s") is not None:
        parts.append(f"{run['steady_block_s']:.2f} s/block")
    if run.get("train_tflops"):
        parts.append(f"{run['train_tflops']:.3g} TFLOP/s, {run['step_s'] * 1e3:.1f} ms/step")
    if run.get("peak_gpu_bytes"):
        parts.append(f"peak GPU {run['peak_gpu_bytes'] / 2**30:.2f} GiB")
    if run.get("why"):
        parts.append(run["why"])
    return " | ".join(parts)


def _f(x: float | None, spec: str = ".3g", scale: float = 1.0) -> str:
    return "-" if x is None else format(x * scale, spec)


def _steady_tflops(run: dict[str, Any]) -> float | None:
    """TFLOP/s of the last unit alone: the steady state, without the first block's one-time costs
    (CUDA context, cuBLAS heuristics and the first autocast kernels: 2.8 s of block 0 on an H100)."""
    last = run.get("last_unit")
    if not last or not last.get("seconds"):
        return None
    return last["flops"] / last["seconds"] / 1e12


def table(runs: list[dict[str, Any]], rates: dict[str, float | None]) -> list[str]:
    lines = [
        "| configuration | status | s/block (steady) | train TFLOP/s (all blocks) | steady TFLOP/s (last block) "
        "| steady % of bf16 matmul | % of bf16 matmul | % of fp32 matmul | % of tf32 matmul "
        "| ms/step | overhead ms/step | peak GPU GiB | peak RSS GiB | projected min (PROJECTION) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        ratio = r.get("ratio_to_matmul") or {}
        proj = r.get("projection") or {}
        steady = _steady_tflops(r)
        steady_ratio = steady / rates["bf16"] if steady and rates.get("bf16") else None
        lines.append(
            f"| {r['name']} | {r['status']} | {_f(r.get('steady_block_s'), '.2f')} | {_f(r.get('train_tflops'))} "
            f"| {_f(steady)} | {_f(steady_ratio, '.1f', 100)} "
            f"| {_f(ratio.get('bf16'), '.1f', 100)} | {_f(ratio.get('fp32'), '.1f', 100)} | {_f(ratio.get('tf32'), '.1f', 100)} "
            f"| {_f(r.get('step_s'), '.1f', 1e3)} | {_f(r.get('overhead_per_step_s'), '.1f', 1e3)} "
            f"| {_f(r.get('peak_gpu_bytes'), '.2f', 2**-30)} | {_f(r.get('peak_rss_bytes'), '.2f', 2**-30)} "
            f"| {_f(proj.get('total_min'), '.1f')} |"
        )
    return lines


def markdown(result: dict[str, Any]) -> str:
    m, s, sz = result["machine"], result["shape"], result["sizes"]
    mm = result["matmul"]
    lines = [
        f"# Device benchmark ({result['protocol']}), {result['date']}",
        "",
        f"Machine: {m['gpu'] or 'CPU only'}, {m['cpu_count']} CPUs; torch {m['torch']}, transformers "
        f"{m['transformers']}; prunekit {m['prunekit_commit']}.",
        f"Model: Llama shape `{s['name']}` (hidden {s['hidden']}, MLP {s['mlp']}, {s['heads']} heads, "
        f"{s['blocks']} blocks, vocabulary {s['vocab']}), random weights; {sz['windows']} windows x {sz['seqlen']} "
        f"tokens (10% held out), batch {sz['batch_size']}, BR+GP {sz['epochs']} epoch(s), 50% unstructured.",
        f"Matmul {mm['size']}-square TFLOP/s before: {fmt_rates(mm['before'] or {})}; after: {fmt_rates(mm['after'] or {})}.",
        "",
        *table(result["configs"], mm["before"] or {}),
        "",
        f"The last column is a PROJECTION (not measured): {s['project_blocks']} blocks at the Rethinking paper's sizes "
        f"({PAPER['windows']} windows x {PAPER['seqlen']} tokens, {PAPER['epochs']} epochs, batch {PAPER['batch_size']}: "
        "320 steps per block), from the measured per-step time and the rest of the per-block time scaled by the "
        "calibration tokens (for masks-only runs an upper bound).",
    ]
    dm = result.get("default_model")
    if dm and dm.get("runs"):
        d = dm["shape"]
        lines += [
            "",
            f"## Default model's shape (SmolLM2-135M), random weights, {d['blocks']} of {d['project_blocks']} blocks, "
            f"{d['windows']} x {d['seqlen']} tokens",
            "",
            *table(dm["runs"], mm["before"] or {}),
            "",
            "Overhead per step = step time minus the counted FLOPs at the same-precision square-matmul rate "
            "(launches, Python, elementwise work, attention, copies; small matmuls run below the square rate too).",
        ]
    if result["skipped"]:
        lines += ["", "Skipped: " + "; ".join(f"{x['name']} ({x['why']})" for x in result["skipped"])]
    return "\n".join(lines) + "\n"


def write(out_dir: Path, result: dict[str, Any]) -> None:
    """``gpu.json`` and ``gpu.md``, each whole or not at all (a temporary name, then a rename)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, text in (("gpu.json", json.dumps(result, indent=2, default=str)), ("gpu.md", markdown(result))):
        tmp = out_dir / f".{name}.tmp"
        tmp.write_text(text)
        tmp.replace(out_dir / name)


if __name__ == "__main__":
    main(sys.argv[1:])
