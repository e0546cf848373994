"""Bytes a run's checkpoint writes, against the saved model's size (protocol checkpoint-bytes-v3).

Issue 12's target: checkpoint bytes per run of the default model at 128 x 1024 tokens at most 2x the
saved model's size. Each configuration is one `prunekit prune` of the float32 copy of the default
model (bench/work/smollm2-135m-f32, made by bench/recon_grid.py), C4 calibration, seed 0, no
evaluation, default `--checkpoint-every 10`; the run's own `checkpoint_bytes` (metrics.json) is
compared with its saved `model.safetensors`. What the checkpoint writes: every block once when final
(plus its masks-only copy with the guard), the blocks the next window still changes and their masks
after every window, and the two activation streams when a resume would spend 10 minutes or more replaying them
(checkpoint-bytes-v2; v1 wrote them every 10 minutes of wall time), so the figure depends
on how long the run takes on the machine (said in the table).

v3 (session 9): pruned weights and masks are stored packed (zeros left out, masks as bits; exact).

    python bench/checkpoint_bytes.py [NAME:NSAMPLES:SEQLEN:RECON ...]   # bench/results/checkpoint-bytes/checkpoint-bytes-v3.json
"""

from __future__ import annotations

import datetime
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
OUT = HERE / "results" / "checkpoint-bytes"
PROTOCOL = "checkpoint-bytes-v3"  # v1: streams every 10 min of wall time; v2: when their replay would take 10 min; v3: v2 with pruned blocks and masks packed (checkpoint.pack)
DEFAULT = ["wanda-lr-128x1024:128:1024:lr", "wanda-br-gp-16x128:16:128:br-gp", "wanda-br-gp-cr-16x128:16:128:br-gp-cr"]


def main(specs: list[str]) -> None:
    model = HERE / "work" / "smollm2-135m-f32"
    if not model.is_dir():
        raise SystemExit(f"{model} is missing: run bench/recon_grid.py once (it writes the float32 copy)")
    OUT.mkdir(parents=True, exist_ok=True)
    path = OUT / f"{PROTOCOL}.json"
    rows = json.loads(path.read_text())["rows"] if path.is_file() else []
    data_dir = os.environ.get("PRUNEKIT_DATA_DIR", str(ROOT.parent / "shared" / "data"))
    for spec in specs:
        name, n, seqlen, recon = spec.split(":")
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "run"
            cmd = [sys.executable, "-m", "prunekit", "prune", "--model", str(model), "--method", "wanda", "--recon", recon,
                   "--calib", "c4", "--nsamples", n, "--seqlen", seqlen, "--eval", "none", "--device", "cpu",
                   "--data-dir", data_dir, "--out", str(out)]
            if recon != "lr":
                cmd += ["--epochs", "1"]
            subprocess.run(cmd, check=True, env=dict(os.environ, PYTHONPATH=str(ROOT / "src")))
            metrics = json.loads((out / "metrics.json").read_text())
            size = (out / "model.safetensors").stat().st_size
        rows = [r for r in rows if r["name"] != name] + [{
            "name": name, "recon": recon, "nsamples": int(n), "seqlen": int(seqlen), "checkpoint_bytes": metrics["checkpoint_bytes"],
            "model_bytes": size, "ratio": metrics["checkpoint_bytes"] / size, "prune_s": metrics["timing"]["prune_s"],
            "threads": int(os.environ.get("OMP_NUM_THREADS") or 0) or None, "date": datetime.date.today().isoformat(),
        }]
        print(json.dumps(rows[-1]), flush=True)
    result = {"protocol": PROTOCOL, "date": datetime.date.today().isoformat(), "machine": f"{os.cpu_count()} CPU cores",
              "rows": rows}  # threads (OMP_NUM_THREADS) and date are per row: rows come from different sessions
    path.write_text(json.dumps(result, indent=1))
    lines = ["| run | calibration | checkpoint bytes | saved model | ratio | prune time | threads |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['name']} | {r['nsamples']} x {r['seqlen']} | {r['checkpoint_bytes'] / 2**20:.0f} MiB | "
                     f"{r['model_bytes'] / 2**20:.0f} MiB | {r['ratio']:.2f}x | {r['prune_s'] / 60:.1f} min | {r.get('threads') or '-'} |")
    (OUT / f"{PROTOCOL}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main(sys.argv[1:] or DEFAULT)
