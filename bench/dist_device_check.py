"""Issue 14's device check: the NCCL path on one GPU (world size 1), run by bench/gpu_device.sh.

    torchrun --standalone --nproc-per-node 1 bench/dist_device_check.py OUT_DIR

Builds a random 2-block LLaMA (hidden 1024) on the machine, prunes it with Wanda BR+GP (guard on)
once as a plain process (``Ranks()``) and once through the process group torchrun set up (NCCL on
a GPU, gloo on a CPU), and writes ``dist_check.json``: the backend, the bytes all-reduced, the time
of both runs, and whether masks and weights agree (identical masks, weights within 1e-4 on a GPU
whose kernels need not be bitwise reproducible). Also runs on a CPU, where it is gloo.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from prunekit import dist  # noqa: E402
from prunekit.config import PruneConfig  # noqa: E402
from prunekit.pipeline import prune  # noqa: E402


def model() -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=1024, intermediate_size=2816, num_hidden_layers=2, num_attention_heads=16,
                      num_key_value_heads=16, vocab_size=4096, max_position_embeddings=512)
    cfg._attn_implementation = "sdpa"
    return LlamaForCausalLM(cfg).eval()


def main() -> None:
    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    ranks = dist.init(dist.from_env())
    cfg = PruneConfig(batch_size=8, device="auto")
    cfg.sparsity.method = "wanda"
    cfg.recon.recon = "br-gp"
    cfg.recon.epochs = 1
    ids = torch.randint(0, 4096, (32, 256), generator=torch.Generator().manual_seed(1))
    results = {}
    states = {}
    for name, r in (("plain", dist.Ranks()), ("process_group", ranks)):
        t = time.perf_counter()
        m, report = prune(model(), None, cfg, calib_ids=ids, progress=False, ranks=r)
        results[name] = {"seconds": time.perf_counter() - t, "guard": report.guard.summary if report.guard else None}
        states[name] = {k: v.detach().cpu() for k, v in m.state_dict().items()}
    a, b = states["plain"], states["process_group"]
    results.update({
        "backend": ranks.backend, "world": ranks.world, "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
        "traffic": dist.TRAFFIC.to_dict(),
        "masks_identical": all(torch.equal(a[k] == 0, b[k] == 0) for k in a if k.endswith("proj.weight")),
        "max_abs_weight_diff": max(float((a[k] - b[k]).abs().max()) for k in a),
        "torch": torch.__version__,
    })
    results["ok"] = results["masks_identical"] and results["max_abs_weight_diff"] < 1e-4 and ranks.active
    if ranks.main:
        (out / "dist_check.json").write_text(json.dumps(results, indent=1))
        print(f"[dist-check] {json.dumps(results)}", flush=True)
    dist.shutdown(ranks)
    sys.exit(0 if results["ok"] else 1)


if __name__ == "__main__":
    main()
