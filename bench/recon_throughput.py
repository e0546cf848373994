"""Reconstruction training throughput against the machine's float32 matmul rate (issue 3 target).

Protocol "recon-throughput-v1": the default model (float32 copy) cut to its first 4 blocks; Wanda
50% with C4 calibration, 16 windows of 256 tokens (2 held out), seed 0; BR+GP for 2 epochs at batch
1 and batch 8 (the cpu-recon-v1 and paper batch sizes). Throughput = the units' counted FLOPs of
their linears (forward + backward for each training step, backward = 2x forward; forward only for
the per-epoch held-out check; attention scores are not counted, so this understates) divided by the
units' training time (steps and held-out checks), against a 1024x1024 float32 matmul measured in the
same process just before and just after. Results before 2026-11-23 did not count the held-out
forward passes (about 5% of the work) although their time was included.
Run it on a quiet machine: `python bench/recon_throughput.py`; writes
bench/results/recon-throughput-v1.json (the committed runs were renamed -run1, -run2).
"""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

import torch

import prunekit
from prunekit.config import PruneConfig
from prunekit.run import matmul_gflops

HERE = Path(__file__).parent


def main() -> None:
    from recon_grid import dense_copy, write_json

    device = torch.device("cpu")
    model, tok = prunekit.load_model(str(dense_copy(HERE / "work")), dtype="float32")
    model.model.layers = model.model.layers[:4]
    model.config.num_hidden_layers = 4
    state = {k: v.clone() for k, v in model.state_dict().items()}
    rows = []
    for batch in (1, 8):
        model.load_state_dict(state)
        cfg = PruneConfig(batch_size=batch, device="cpu")
        cfg.calib.calib, cfg.calib.nsamples, cfg.calib.seqlen, cfg.calib.seed = "c4", 16, 256, 0
        cfg.calib.data_dir = os.environ.get("PRUNEKIT_DATA_DIR", "../shared/data")
        cfg.recon.recon, cfg.recon.epochs = "br-gp", 2
        before = matmul_gflops(device, seconds=2.0)
        t = time.perf_counter()
        _, report = prunekit.prune(model, tok, cfg, progress=False)
        wall = time.perf_counter() - t
        after = matmul_gflops(device, seconds=2.0)
        train_s = sum(u.seconds for u in report.units)
        flops = sum(u.flops for u in report.units)
        rate = flops / train_s / 1e9
        rows.append({
            "batch_size": batch, "units": len(report.units), "steps": sum(u.steps for u in report.units),
            "train_s": train_s, "prune_wall_s": wall, "train_gflops": rate,
            "matmul_gflops_before": before, "matmul_gflops_after": after,
            "fraction": rate / ((before + after) / 2),
        })
        print(json.dumps(rows[-1]))
    out = {
        "protocol": "recon-throughput-v1",
        "machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "platform": platform.platform()},
        "torch": torch.__version__,
        "runs": rows,
    }
    dest = HERE / "results" / "recon-throughput-v1.json"
    write_json(dest, out)


if __name__ == "__main__":
    main()
