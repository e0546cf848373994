"""Issue 14: expected scaling of data-parallel BR+GP to 8 GPUs, and the cost of a 70B run (a PROJECTION).

Inputs, each named where it is used:
- measured here (bench/results/cpu-dist-v1/wanda-br-gp.json, bench/distributed.py): the bytes rank 0
  all-reduced in a 2-process BR+GP run of the default model, checked against the formula below
  (gradients of every trainable parameter of the block, float32, once per step, plus statistics);
- measured on an H100 (../shared/GPU.md): a LLaMA-7B-shaped block's BR+GP gradient step on 8 x 1024
  tokens takes about 0.26 s in float32 (35.5 TFLOP/s) and 0.13 s with TF32;
- published (nccl-tests reference, docs.alayanew.com "NCCL-tests in practice", 2026): all-reduce bus
  bandwidth on 8 x H100 SXM (NVLink 4, NVSwitch) 460-480 GB/s at large sizes; 460 is used;
- the Rethinking paper's sizes: 256 windows of 1024 tokens, batch 8, 10 epochs: 320 steps per block.

Model of one gradient step on N ranks: compute = (windows of the step on the busiest rank) x (the
per-window time, the 8-window step time / 8: compute assumed linear in tokens, which flatters small
per-rank batches) + all-reduce of the gradients, ``bytes x 2(N-1)/N / busbw`` (prunekit reduces after
the backward pass, without overlap). ``--dp-batches global`` (the single-process batches): the busiest
rank's share of 8 windows drawn from contiguous shards is simulated; ``local``: 8/N per rank.

    python bench/dist_projection.py   # writes bench/results/cpu-dist-v1/projection.md
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "cpu-dist-v1"
BUSBW = 460e9  # bytes/s, nccl-tests all-reduce busbw on 8 x H100 SXM (see the docstring)
STEP_7B = {"fp32": 0.26, "tf32": 0.13}  # s per 8 x 1024-token BR+GP step of a 7B-shaped block (GPU.md, measured)
STEPS = 320  # per block at the Rethinking paper's sizes
BATCH = 8


def block_params(hidden: int, mlp: int, heads: int, kv_heads: int) -> int:
    """Linear weights of a LLaMA block (norm weights are negligible)."""
    head = hidden // heads
    return hidden * hidden * 2 + 2 * hidden * kv_heads * head + 3 * hidden * mlp


SHAPES = {  # name: (hidden, MLP, heads, KV heads, blocks)
    "LLaMA-7B": (4096, 11008, 32, 32, 32),
    "LLaMA-2-70B": (8192, 28672, 64, 8, 80),
}


def busiest_share(n_ranks: int, windows: int = 256, batch: int = BATCH, trials: int = 20000) -> float:
    """Expected windows of a global batch on its busiest rank when windows sit in contiguous shards."""
    g = torch.Generator().manual_seed(0)
    owner = torch.arange(windows) * n_ranks // windows
    total = 0
    for _ in range(trials // 100):
        perms = torch.stack([torch.randperm(windows, generator=g)[:batch] for _ in range(100)])
        counts = torch.nn.functional.one_hot(owner[perms], n_ranks).sum(1)
        total += int(counts.max(1).values.sum())
    return total / (trials // 100 * 100)


def project(name: str, mode: str, n: int, batches: str) -> dict:
    hidden, mlp, heads, kv, blocks = SHAPES[name]
    params = block_params(hidden, mlp, heads, kv)
    step1 = STEP_7B[mode] * params / block_params(*SHAPES["LLaMA-7B"][:4])  # compute scales with the weights
    per_window = step1 / BATCH
    busiest = BATCH / n if batches == "local" else busiest_share(n)
    comm = 0.0 if n == 1 else 4 * params * 2 * (n - 1) / n / BUSBW
    step = busiest * per_window + comm
    return {"model": name, "mode": mode, "ranks": n, "batches": batches, "params_per_block": params,
            "grad_bytes_per_step": 4 * params, "busiest_windows": busiest, "step_s": step, "comm_s": comm,
            "block_min": STEPS * step / 60, "model_h": blocks * STEPS * step / 3600,
            "speedup": (STEPS * step1) / (STEPS * step)}


def main() -> None:
    lines = ["# Data-parallel BR+GP on 8 GPUs: a projection (bench/dist_projection.py)", ""]
    measured = RESULTS / "wanda-br-gp.json"
    if measured.is_file():
        run = json.loads(measured.read_text())
        d = run["two"]["distributed"]
        # SmolLM2-135M block: hidden 576, MLP 1536, 9 heads, 3 KV heads; every parameter trained (norms too)
        params = block_params(576, 1536, 9, 3) + 2 * 576
        steps = math.ceil(58 / 8)  # cpu-dist-v1: 58 training windows, batch 8, 1 epoch
        expected = 30 * 4 * (params * steps + params * 0)
        lines += [
            f"Measured (cpu-dist-v1, 2 processes, the default model's 30 blocks): rank 0 all-reduced "
            f"{d['all_reduce_bytes'] / 1e6:.0f} MB in {d['all_reduce_calls']} tensors, {d['all_reduce_bytes'] / 30 / 1e6:.1f} MB "
            f"per block; gradients alone (float32, {steps} steps x {params / 1e6:.2f} M parameters) are "
            f"{expected / 30 / 1e6:.1f} MB per block, the rest is the Wanda norms, error sums and the guard's measures. "
            f"It spent {d['seconds']:.0f} s in collectives (transfer and waiting for the other rank).", "",
        ]
    lines += [
        f"Per-step model (docstring): compute from GPU.md's measured 7B step (0.26 s fp32, 0.13 s TF32 for 8 x 1024 tokens), "
        f"scaled by weights; all-reduce at {BUSBW / 1e9:.0f} GB/s busbw; {STEPS} steps per block (Rethinking sizes).", "",
        "| model | precision | GPUs | batches | windows on busiest rank | grad MB / step | all-reduce ms / step | step s | per block, min | whole model, h | GPU-hours | speed-up |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name in SHAPES:
        for mode in ("fp32", "tf32"):
            for n, batches in ((1, "global"), (8, "global"), (8, "local")):
                p = project(name, mode, n, batches)
                lines.append(
                    f"| {name} | {mode} | {n} | {batches if n > 1 else '-'} | {p['busiest_windows']:.2f} | "
                    f"{p['grad_bytes_per_step'] / 1e6:.0f} | {1000 * p['comm_s']:.1f} | {p['step_s']:.3f} | {p['block_min']:.1f} | "
                    f"{p['model_h']:.2f} | {n * p['model_h']:.1f} | {p['speedup']:.1f}x |"
                )
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "projection.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
