"""Time the main job (protocol main-job-v1): `prunekit prune --out runs/quickstart --overwrite`, no other flags.

A fresh calibration cache (PRUNEKIT_CACHE_DIR in a temporary folder, so the self-generated text is
written again), PRUNEKIT_DATA_DIR from the environment, `/usr/bin/time -v` for wall time and peak
RSS. Nothing else should run meanwhile (pause benchmark workers with SIGSTOP). The run's own
metrics.json is merged into the result.

    python bench/main_job.py NAME [PRUNE FLAGS...]   # writes bench/results/main-job/NAME.json

Extra flags after NAME go to `prunekit prune` (to time an alternative default); the protocol string
in the result names them.
"""

from __future__ import annotations

import datetime
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

from recon_grid import write_json

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def _time_field(report: str, label: str) -> str:
    m = re.search(rf"^\s*{re.escape(label)}: (.+)$", report, re.M)
    if not m:
        raise SystemExit(f"/usr/bin/time -v printed no {label!r} line; is GNU time installed (apt install time)?")
    return m.group(1).strip()


def main() -> None:
    if len(sys.argv) < 2:
        raise SystemExit("usage: python bench/main_job.py NAME [PRUNE FLAGS...]")
    name, extra = sys.argv[1], sys.argv[2:]
    out = ROOT / "runs" / "quickstart"
    with tempfile.TemporaryDirectory() as cache:
        env = {**os.environ, "PRUNEKIT_CACHE_DIR": cache}
        cmd = ["/usr/bin/time", "-v", str(ROOT / ".venv" / "bin" / "prunekit"), "prune", "--out", str(out), "--overwrite", *extra]
        proc = subprocess.run(cmd, env=env, cwd=ROOT, stderr=subprocess.PIPE, text=True)
    if proc.returncode:
        sys.stderr.write(proc.stderr[-3000:])
        raise SystemExit(f"the main job failed (exit {proc.returncode})")
    metrics = json.loads((out / "metrics.json").read_text())
    metrics.get("sparsity", {}).pop("per_layer", None)
    result = {
        "protocol": "main-job-v1: `prunekit prune --out runs/quickstart --overwrite"
        + "".join(f" {x}" for x in extra) + "` (" + ("these flags only" if extra else "no other flags") + "), fresh "
        "PRUNEKIT_CACHE_DIR, PRUNEKIT_DATA_DIR=" + os.environ.get("PRUNEKIT_DATA_DIR", "(unset)")
        + ", nothing else running (benchmarks paused with SIGSTOP), /usr/bin/time -v",
        "date": datetime.date.today().isoformat(),
        "wall": _time_field(proc.stderr, "Elapsed (wall clock) time (h:mm:ss or m:ss)"),
        "max_rss_mb": int(_time_field(proc.stderr, "Maximum resident set size (kbytes)")) / 1024,
        **metrics,
    }
    write_json(HERE / "results" / "main-job" / f"{name}.json", result)
    print(json.dumps({k: result[k] for k in ("wall", "max_rss_mb")}), metrics.get("perplexity"), metrics.get("timing"))


if __name__ == "__main__":
    main()
