"""A reconstruction step of the default model's block at batch 8 x 1024 on the CPU, and its overhead
(issue 12's CPU target: "no slower than now, and the overhead per step measured and reported").

Protocol "cpu-step-v1". A Llama of SmolLM2-135M's shape (hidden 576, 9 heads / 3 KV heads, MLP 1536,
vocabulary 49152) with 2 blocks and random weights (seed 0), float32; 26 random windows of 1024
tokens (10% held out: 3 training steps per block at batch 8); Wanda 50%, BR+GP 1 epoch, batch 8,
through ``prunekit.prune`` with the defaults otherwise. The step is the last unit's (block 1:
no first-call costs): its seconds over its steps; its counted FLOPs (prunekit's count: the linears,
forward + backward, and the held-out forward) at a 1024-square float32 matmul rate measured in the
same process give the arithmetic time, the rest is the overhead per step.

It only uses the API that existed before issue 12 (``prunekit.prune(model, None, cfg,
calib_ids=...)``, ``UnitRecord.steps/seconds/flops``), so the same script times an older tree:

    PYTHONPATH=src python bench/cpu_step.py --label head --out bench/results/cpu-step-v1
    PYTHONPATH=/path/to/old/src python bench/cpu_step.py --label 3658378 --out bench/results/cpu-step-v1

Run on a quiet machine; the two trees alternately (``--repeat``) so that drift hits both.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--label", required=True, help="the tree's name in the results (a commit)")
    p.add_argument("--out", default="bench/results/cpu-step-v1")
    p.add_argument("--windows", type=int, default=26)
    p.add_argument("--seqlen", type=int, default=1024)
    args = p.parse_args()

    import prunekit
    from prunekit.config import PruneConfig
    from prunekit.run import matmul_gflops  # 1024-square float32, 1 s; the same signature in the older trees
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    cfg_model = LlamaConfig(hidden_size=576, intermediate_size=1536, num_attention_heads=9, num_key_value_heads=3,
                            num_hidden_layers=2, vocab_size=49152, max_position_embeddings=2048, tie_word_embeddings=True)
    model = AutoModelForCausalLM.from_config(cfg_model).float().eval()
    ids = torch.randint(0, 49152, (args.windows, args.seqlen), generator=torch.Generator().manual_seed(0))
    cfg = PruneConfig(batch_size=8, device="cpu")
    cfg.sparsity.method = "wanda"
    cfg.recon.recon = "br-gp"
    cfg.recon.epochs = 1
    cpu = torch.device("cpu")
    before = matmul_gflops(cpu)
    t = time.perf_counter()
    _, report = prunekit.prune(model, None, cfg, calib_ids=ids, progress=False)
    wall = time.perf_counter() - t
    after = matmul_gflops(cpu)
    units = [u for u in report.units if u.steps]
    last = units[-1]
    rate = (before + after) / 2
    step_s = last.seconds / last.steps
    result = {
        "protocol": "cpu-step-v1", "label": args.label, "date": time.strftime("%Y-%m-%d %H:%M"),
        "machine": {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
                    "torch": torch.__version__, "omp": os.environ.get("OMP_NUM_THREADS")},
        "windows": args.windows, "seqlen": args.seqlen, "batch": 8,
        "matmul_gflops": {"before": before, "after": after},
        "wall_s": wall, "unit": last.unit, "steps": last.steps, "unit_s": last.seconds, "flops": last.flops,
        "step_s": step_s, "gflops": last.flops / last.seconds / 1e9,
        "arithmetic_s_per_step": last.flops / (rate * 1e9) / last.steps,
        "overhead_s_per_step": (last.seconds - last.flops / (rate * 1e9)) / last.steps,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{args.label}-{time.strftime('%H%M%S')}.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=2))
    tmp.replace(path)
    print(f"[cpu-step] {args.label}: {step_s * 1e3:.0f} ms/step ({result['gflops']:.1f} GFLOP/s of {rate:.1f}), "
          f"overhead {result['overhead_s_per_step'] * 1e3:.0f} ms/step; wrote {path}", flush=True)


if __name__ == "__main__":
    main()
