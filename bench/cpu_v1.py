"""Benchmark protocol "cpu-v1": one run per process, so peak memory is the run's own.

Protocol (issue 2): the default model (SmolLM2-135M-Instruct, GGUF dequantized to float32);
calibration 64 windows of 512 tokens from the C4 train slice, seed 0; WikiText-2 (test) perplexity
at 512 tokens on the first 128 windows and on all windows (one pass; the first-128 figure is taken
from the same per-window losses). Runs: dense, and magnitude / Wanda / SparseGPT at 50%
unstructured and at 2:4.

    python bench/cpu_v1.py RUN [--data-dir DIR]     RUN in: dense, magnitude-50, wanda-50,
                                                     sparsegpt-50, magnitude-2:4, wanda-2:4, sparsegpt-2:4
Writes bench/results/cpu-v1/RUN.json (":" replaced by "-").
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import time
from pathlib import Path

import torch

import prunekit
from prunekit.data import eval_text, eval_windows
from prunekit.evaluate import perplexity_of_ids

RUNS = {
    "dense": None,
    "magnitude-50": ("magnitude", "0.5"),
    "wanda-50": ("wanda", "0.5"),
    "sparsegpt-50": ("sparsegpt", "0.5"),
    "magnitude-2:4": ("magnitude", "2:4"),
    "wanda-2:4": ("wanda", "2:4"),
    "sparsegpt-2:4": ("sparsegpt", "2:4"),
}
PROTOCOL = {
    "name": "cpu-v1",
    "model": "smollm2-135m (float32)",
    "calib": "c4 train slice",
    "nsamples": 64,
    "seqlen": 512,
    "seed": 0,
    "eval": "wikitext2 test, 512-token non-overlapping windows, first 128 and all",
    "batch_size": 8,
    "recon": "lr (no reconstruction)",
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("run", choices=sorted(RUNS))
    ap.add_argument("--data-dir", default=os.environ.get("PRUNEKIT_DATA_DIR", "../shared/data"))
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "cpu-v1"))
    ap.add_argument(
        "--timing-only", action="store_true", help="prune without evaluating; writes OUT/timing/RUN.json (a quiet re-time)"
    )
    a = ap.parse_args()

    t0 = time.perf_counter()
    model, tok = prunekit.load_model("smollm2-135m", dtype="float32")
    load_s = time.perf_counter() - t0
    result: dict = {"run": a.run, "protocol": PROTOCOL, "load_s": load_s}
    if RUNS[a.run] is not None:
        method, sparsity = RUNS[a.run]
        cfg = prunekit.PruneConfig(batch_size=PROTOCOL["batch_size"], device="cpu")
        cfg.recon.recon = "lr"  # layer-wise pruning only (the library default reconstructs)
        cfg.calib.calib = "c4"
        cfg.calib.data_dir = a.data_dir
        cfg.calib.nsamples = PROTOCOL["nsamples"]
        cfg.calib.seqlen = PROTOCOL["seqlen"]
        cfg.calib.seed = PROTOCOL["seed"]
        cfg.sparsity.method = method
        cfg.sparsity.sparsity = sparsity
        model, report = prunekit.prune(model, tok, cfg)
        result.update(
            method=method,
            sparsity=sparsity,
            scope=report.scope,
            prune_s=report.timing["prune_s"],
            calib_s=report.timing.get("calib_s", 0.0),
            overall_sparsity=report.overall,
        )
    if a.timing_only:
        result.update(peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
        _write(Path(a.out) / "timing", a.run, result)
        return
    ids = tok(eval_text("wikitext2", a.data_dir))["input_ids"]
    windows = eval_windows(ids, 512)
    ppl = perplexity_of_ids(model, "wikitext2", windows, PROTOCOL["batch_size"], "cpu")
    result.update(
        wikitext2_ppl_first128=ppl.ppl_first(128),
        wikitext2_ppl_all=ppl.ppl,
        eval_windows=ppl.windows,
        eval_s=ppl.seconds,
        peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        total_s=time.perf_counter() - t0,
        machine={"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "platform": platform.platform()},
        versions={"torch": torch.__version__, "prunekit": prunekit.__version__, "python": sys.version.split()[0]},
    )
    _write(Path(a.out), a.run, result)


def _write(out: Path, run: str, result: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{run.replace(':', '-')}.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=2))
    os.replace(tmp, path)
    print(json.dumps({k: v for k, v in result.items() if k not in ("protocol", "machine", "versions")}, indent=2))


if __name__ == "__main__":
    main()
