"""Issue 14 benchmark: 1 process x 2 threads against 2 processes x 1 thread (torchrun, gloo) on this machine.

Protocol (protocol name ``cpu-dist-v1``; sized for a 2-core CPU):
- the default model (SmolLM2-135M-Instruct, dequantized once to float32 safetensors by
  bench/recon_grid.py's ``dense_copy``), Wanda 50% unstructured, C4 calibration of 64 windows of
  256 tokens (seed 0; holdout 0.1, so 58 training and 6 held-out windows), batch 8;
- four settings: ``wanda-lr`` (masks only), ``wanda-br-gp`` (BR+GP, 1 epoch, recon batch 8, lr 2e-4,
  guard revert: data-parallel under torchrun), ``free-lunch`` (attention/MLP units on dense inputs,
  2 epochs, recon batch 8: block-parallel under torchrun) and ``free-lunch-data`` (the same,
  forced data-parallel with ``--parallel data``);
- each run once as ``OMP_NUM_THREADS=2 prunekit prune ...`` and once as ``OMP_NUM_THREADS=1 torchrun
  --standalone --nproc-per-node 2 -m prunekit prune ...``, one after the other on an otherwise idle
  machine; WikiText-2 perplexity on 16 windows of 512 tokens, measured by rank 0 only;
- measured: wall time of the command, the run's own prune time (``timing.prune_s``), peak RSS of
  each process (VmHWM, polled from /proc every 0.5 s), perplexity, the share of mask entries that
  differ from the 1-process run, and rank 0's collective traffic (bytes all-reduced, seconds in
  collectives).

Targets (issue 14): the same masks, perplexity within 0.5%, 2-process prune time <= 1.2x the
1-process time for data-parallel and <= 0.7x for block-parallel free-lunch.

Usage: ``.venv/bin/python bench/distributed.py [--only NAME,...]``; results go to
``bench/results/cpu-dist-v1/`` (one JSON per run and ``summary.md``); the saved models to
``bench/work/cpu-dist-v1/`` (ignored).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

from recon_grid import dense_copy  # noqa: E402

PROTOCOL = "cpu-dist-v1"
COMMON = ["--method", "wanda", "--sparsity", "0.5", "--calib", "c4", "--nsamples", "64", "--seqlen", "256",
          "--batch-size", "8", "--eval", "wikitext2", "--eval-seqlen", "512", "--eval-windows", "16", "--eval-batch-size", "4"]
SETTINGS = {
    "wanda-lr": ["--recon", "lr"],
    "wanda-br-gp": ["--recon", "br-gp", "--epochs", "1", "--recon-batch-size", "8", "--lr", "2e-4"],
    "free-lunch": ["--recon", "free-lunch", "--epochs", "2", "--recon-batch-size", "8", "--lr", "2e-4"],
    # the same run data-parallel (what --parallel auto does not pick for it), to compare the two modes
    "free-lunch-data": ["--recon", "free-lunch", "--epochs", "2", "--recon-batch-size", "8", "--lr", "2e-4", "--parallel", "data"],
}


def peak_rss_of_tree(root: int, peaks: dict[int, int]) -> None:
    """Record VmHWM (peak RSS, kB) of every python process below ``root`` (torchrun's agent and ranks)."""
    try:
        out = subprocess.run(["ps", "-eo", "pid,ppid,comm"], capture_output=True, text=True).stdout.splitlines()[1:]
    except OSError:
        return
    children: dict[int, list[int]] = {}
    for line in out:
        pid, ppid, _ = line.split(None, 2)
        children.setdefault(int(ppid), []).append(int(pid))
    todo, tree = [root], []
    while todo:
        p = todo.pop()
        tree.append(p)
        todo += children.get(p, [])
    for pid in tree:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    peaks[pid] = max(peaks.get(pid, 0), int(line.split()[1]))
        except OSError:
            pass


def run(name: str, ranks: int, model: Path, work: Path, data_dir: str) -> dict:
    out = work / f"{name}-{ranks}proc"
    prunekit = [sys.executable, "-m", "prunekit", "prune"]
    if ranks > 1:
        prunekit = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(ranks), "-m", "prunekit", "prune"]
    cmd = [*prunekit, "--model", str(model), *COMMON, *SETTINGS[name], "--out", str(out), "--overwrite", "--data-dir", data_dir]
    env = {**os.environ, "OMP_NUM_THREADS": str(2 // ranks), "PYTHONPATH": str(ROOT / "src")}
    t0 = time.perf_counter()
    peaks: dict[int, int] = {}
    with open(work / f"{name}-{ranks}proc.log", "w") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
        while proc.poll() is None:
            peak_rss_of_tree(proc.pid, peaks)
            time.sleep(0.5)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{name} on {ranks} process(es) failed; see {work}/{name}-{ranks}proc.log")
    metrics = json.loads((out / "metrics.json").read_text())
    ranks_peaks = sorted((kb / 1024 for pid, kb in peaks.items() if pid != proc.pid or ranks == 1), reverse=True)
    return {
        "name": name, "processes": ranks, "threads_per_process": 2 // ranks, "wall_s": wall,
        "prune_s": metrics["timing"]["prune_s"], "recon_s": metrics["timing"].get("recon_s"),
        "peak_rss_mb_per_process": ranks_peaks[:ranks] if ranks > 1 else ranks_peaks[:1],
        "wikitext2": metrics["perplexity"]["wikitext2"], "parallel": metrics["settings"].get("parallel"),
        "distributed": metrics.get("distributed"), "command": " ".join(cmd[1:]), "out": str(out),
    }


def mask_difference(a: Path, b: Path) -> dict:
    """Mask entries (zeros of pruned linears) that differ between two saved models, and max |weight difference|."""
    wa = {k: v for f in sorted(a.glob("*.safetensors")) for k, v in load_file(f).items()}
    wb = {k: v for f in sorted(b.glob("*.safetensors")) for k, v in load_file(f).items()}
    differ = total = 0
    max_diff = 0.0
    for k, v in wa.items():
        if k.endswith("proj.weight") and ".layers." in k:
            differ += int(((v == 0) != (wb[k] == 0)).sum())
            total += v.numel()
        max_diff = max(max_diff, float((v.float() - wb[k].float()).abs().max()))
    return {"mask_entries_differing": differ, "mask_entries": total, "max_abs_weight_diff": max_diff}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default="wanda-lr,wanda-br-gp,free-lunch", help=f"comma-separated, of {', '.join(SETTINGS)}")
    ap.add_argument("--data-dir", default=os.environ.get("PRUNEKIT_DATA_DIR", str(ROOT.parent / "shared" / "data")))
    a = ap.parse_args(argv)
    results_dir = HERE / "results" / PROTOCOL
    work = HERE / "work" / PROTOCOL
    results_dir.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    model = dense_copy(HERE / "work")
    for name in a.only.split(","):
        one = run(name, 1, model, work, a.data_dir)
        two = run(name, 2, model, work, a.data_dir)
        same = mask_difference(Path(one["out"]), Path(two["out"]))
        row = {"protocol": PROTOCOL, "one": one, "two": two, "masks": same,
               "prune_time_ratio": two["prune_s"] / one["prune_s"], "wall_ratio": two["wall_s"] / one["wall_s"],
               "ppl_rel_diff": two["wikitext2"] / one["wikitext2"] - 1, "torch": torch.__version__}
        (results_dir / f"{name}.json").write_text(json.dumps(row, indent=1))
        print(f"{name}: prune {one['prune_s']:.0f}s -> {two['prune_s']:.0f}s ({row['prune_time_ratio']:.2f}x), "
              f"ppl {one['wikitext2']:.3f} -> {two['wikitext2']:.3f}, masks differ {same['mask_entries_differing']}", flush=True)
    write_summary(results_dir)


def write_summary(results_dir: Path) -> None:
    rows = [json.loads(p.read_text()) for p in sorted(results_dir.glob("*.json"))]
    lines = [
        f"# {PROTOCOL}: 1 process x 2 threads vs 2 processes x 1 thread (torchrun, gloo), default model", "",
        "Protocol: bench/distributed.py docstring. Prune time is the run's own `timing.prune_s` (calibration, "
        "masks, reconstruction, guard; not loading or evaluation).", "",
        "| setting | mode (2 proc) | prune s 1p / 2p | ratio | wall s 1p / 2p | peak RSS MB 1p / 2p (each) | WikiText-2 1p / 2p | masks differing | GB all-reduced (rank 0) | s in collectives |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        one, two, d = r["one"], r["two"], r["two"].get("distributed") or {}
        lines.append(
            f"| {one['name']} | {two['parallel']} | {one['prune_s']:.0f} / {two['prune_s']:.0f} | {r['prune_time_ratio']:.2f}x "
            f"| {one['wall_s']:.0f} / {two['wall_s']:.0f} | {one['peak_rss_mb_per_process'][0]:.0f} / "
            f"{' + '.join(f'{x:.0f}' for x in two['peak_rss_mb_per_process'])} | {one['wikitext2']:.3f} / {two['wikitext2']:.3f} "
            f"({100 * r['ppl_rel_diff']:+.2f}%) | {r['masks']['mask_entries_differing']} of {r['masks']['mask_entries']} "
            f"| {(d.get('all_reduce_bytes', 0) + d.get('broadcast_bytes', 0)) / 1e9:.2f} | {d.get('seconds', 0):.1f} |"
        )
    (results_dir / "summary.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
