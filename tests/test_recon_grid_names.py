"""bench/recon_grid.py names each result after every setting that differs from its protocol's, so
runs of the GPU quality list (bench/gpu_quality.sh) and the CPU grid never overwrite each other."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

GRID = Path(__file__).resolve().parents[1] / "bench" / "recon_grid.py"


@pytest.mark.parametrize(("args", "name"), [
    (["wanda-br-gp", "--protocol", "cpu-recon-v2"], "wanda-br-gp"),
    (["wanda-br-gp", "--protocol", "cpu-recon-v2", "--device", "cpu"], "wanda-br-gp"),  # the protocol's own device
    (["wanda-br-gp-cr", "--protocol", "cpu-recon-v2", "--loss", "kd", "--guard", "revert", "--contexts", "256+1024",
      "--device", "cuda"], "wanda-br-gp-cr-losskd-guardrevert-ctx256+1024-cuda"),
    (["wanda-lr", "--protocol", "cpu-recon-v2", "--sparsity", "0.7", "--owl", "--zeroshot", "200"], "wanda-lr-sp0.7-owl-zs200"),
    (["wanda-retrain", "--protocol", "cpu-recon-v2", "--retrain-loss", "kd", "--lora-rank", "16", "--epochs", "20"],
     "wanda-retrain-retrainkd-lora16-epochs20"),
    (["wanda-br-gp", "--protocol", "cpu-recon-v2", "--calib-mix", "0.5", "--nsamples", "128"], "wanda-br-gp-c4-128-mix0.5"),
    (["dense", "--protocol", "cpu-recon-v2", "--zeroshot", "0", "--device", "cuda"], "dense-zs0-cuda"),
])
def test_result_names(args, name):
    out = subprocess.run([sys.executable, str(GRID), *args, "--print-name"], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == name
