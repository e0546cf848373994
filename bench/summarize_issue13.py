"""Issue 13's tables from bench/results/cpu-recon-v2: sparsity 60/70% with and without OWL, the Free
Lunch comparison (retrain, free-lunch, attn-mlp+GP) and calibration source, as far as measured.

Reads every result whose name marks it as one of these runs (``-sp``, ``-owl``, ``retrain``,
``free-lunch``, ``attn-mlp``, ``-self-``, ``-mix``, ``-zs``, SparseGPT BR+GP on more C4 windows) and,
for reference, the 50% LR and BR+GP cells.
The device column says where a run went: protocol cpu-recon-v2 names the sizes; ``cuda`` runs
(bench/gpu_quality.sh) computed the same thing on a lent GPU.

    python bench/summarize_issue13.py > bench/results/cpu-recon-v2/issue13.md
"""

from __future__ import annotations

import json
import re
from pathlib import Path

RESULTS = Path(__file__).parent / "results" / "cpu-recon-v2"
MARKS = re.compile(r"-sp0|-owl|retrain|free-lunch|attn-mlp|-self-|-mix|-zs|^wanda-br-gp|^sparsegpt-br-gp-c4-")
REFERENCE = ("wanda-lr", "wanda-lr-ctx256+1024", "wanda-lr-ctx256+1024-cuda", "sparsegpt-lr", "magnitude-lr")  # ^wanda-br-gp: MARKS


def row(d: dict) -> str:
    s = d.get("sparsity", {})
    owl = "yes" if s.get("owl") else "no"
    guard = (d.get("reconstruction") or {}).get("guard") or {}
    windows = guard.get("windows") or []
    reverted = f"{sum(w.get('reverted', False) for w in windows)} of {len(windows)}" if windows else "-"
    ppl = d.get("perplexity") or {}
    t = d.get("timing", {})
    gpu = d.get("peak_gpu_mb")
    zs = d.get("zeroshot") or {}
    zs_mean = f"{100 * zs['mean_acc']:.1f} (limit {zs.get('limit') or 'all'})" if zs.get("mean_acc") is not None else "-"
    return (f"| {d['run']} | {d['protocol'].get('device', 'cpu')} | {s.get('target', '-')} / {s.get('overall', 0):.4f} | {owl} | "
            f"{ppl.get('wikitext2', float('nan')):.2f} | {ppl.get('c4', float('nan')):.2f} | {t.get('prune_s', 0):.0f} | "
            f"{(gpu / 1024 if gpu else 0):.2f} | {d.get('peak_rss_mb', 0) / 1024:.2f} | {reverted} | {zs_mean} |")


FREE_LUNCH = re.compile(r"^wanda-(lr|free-lunch|attn-mlp-gp|br-gp|br-gp-cr|retrain)(-|$)")
DENSE_WIKI = "dense"


def training_compute(d: dict) -> tuple[float, float]:
    """(FLOPs, seconds) spent training: local reconstruction's units, or retraining (with its teacher)."""
    rt = d.get("retrain") or {}
    if rt:
        return rt.get("flops", 0.0) + rt.get("teacher_flops", 0.0), rt.get("seconds", 0.0)
    r = d.get("reconstruction") or {}
    c = r.get("compute") or {}
    units = r.get("units") or []
    flops = c.get("flops") or sum(u.get("flops", 0.0) for u in units)
    seconds = c.get("train_s") or sum(u.get("seconds", 0.0) for u in units)
    return flops, seconds


def free_lunch_table(runs: list[dict]) -> None:
    """Issue 13, part 1: local reconstruction against end-to-end retraining at 50% (Wanda), with the
    compute each spent training, as a multiple of free-lunch's (the paper's 'local' setting)."""
    rows = [d for d in runs if FREE_LUNCH.match(d["run"]) and d.get("sparsity", {}).get("target") == 0.5
            and d["protocol"].get("device", "cpu") == "cpu" and "perplexity" in d and "-zs" not in d["run"]
            and d["protocol"].get("calib", "c4") == "c4" and "-mix" not in d["run"]]
    if not rows:
        return
    base = next((training_compute(d)[0] for d in rows if d["run"].startswith("wanda-free-lunch")), 0.0) or None
    dense = json.loads((RESULTS / f"{DENSE_WIKI}.json").read_text())["perplexity"] if (RESULTS / f"{DENSE_WIKI}.json").is_file() else {}
    lr = next((d["perplexity"] for d in rows if d["run"] == "wanda-lr"), None)
    print("\n### The Free Lunch comparison (Wanda 50%, C4 calibration, CPU)\n")
    print("Training compute: the FLOPs of the gradient steps (forward + backward; retraining adds its teacher's "
          "forward passes for kd), as counted by prunekit; 'x free-lunch' divides by the free-lunch run's. "
          "Gap closed: share of the LR -> dense WikiText-2 gap.\n")
    print("| run | WikiText-2 | C4 | gap closed (WikiText-2) | training TFLOP | x free-lunch | training s | prune s | peak RSS GiB |")
    print("|---|---|---|---|---|---|---|---|---|")
    for d in sorted(rows, key=lambda d: d["run"]):
        flops, secs = training_compute(d)
        ppl = d["perplexity"]
        gap = "-"
        if lr and dense.get("wikitext2"):
            gap = f"{100 * (lr['wikitext2'] - ppl['wikitext2']) / (lr['wikitext2'] - dense['wikitext2']):.0f}%"
        ratio = f"{flops / base:.2f}" if base and flops else "-"
        print(f"| {d['run']} | {ppl['wikitext2']:.2f} | {ppl['c4']:.2f} | {gap} | {flops / 1e12:.1f} | {ratio} | "
              f"{secs:.0f} | {d.get('timing', {}).get('prune_s', 0):.0f} | {d.get('peak_rss_mb', 0) / 1024:.2f} |")
    if dense:
        print(f"| dense | {dense['wikitext2']:.2f} | {dense['c4']:.2f} | 100% | - | - | - | - | - |")


CALIB = re.compile(r"^wanda-(br-gp|br-gp-cr)-(self|c4)-(\d+)(-mix0\.5)?-losstoken-mse-guardrevert$")
C4_128 = {"wanda-br-gp-losstoken-mse-guardrevert-ctx256+1024": "br-gp",
          "wanda-br-gp-cr-losstoken-mse-guardrevert-ctx256+1024": "br-gp-cr"}


def calib_table(runs: list[dict]) -> None:
    """Issue 13, part 3: calibration source (C4, self-generated, half and half) and amount, for BR+GP
    and BR+GP+CR (Wanda 50%, token-mse, guard). The C4 runs at 128 windows are issue 10's runs with the
    same settings (their extra long-context evaluation does not change the 512-token figures)."""
    cells = []
    for d in runs:
        m = CALIB.match(d["run"])
        if m:
            source = "mix 50/50" if m.group(4) else ("self" if m.group(2) == "self" else "C4")
            cells.append((m.group(1), source, int(m.group(3)), d))
        elif d["run"] in C4_128:
            cells.append((C4_128[d["run"]], "C4", 128, d))
    if not cells:
        return
    print("\n### Calibration source and amount (Wanda 50%, token-mse, guard revert, CPU)\n")
    print("Errors: each unit's normalised error against its target, averaged over the units (prunekit's "
          "`reconstruction.error`), on the run's own training windows and on its own held-out 10%, so each "
          "source is judged on its own kind of text; WikiText-2 and C4 perplexity are the common yardstick.\n")
    print("| preset | source | windows | WikiText-2 | C4 | calib error before -> after | held-out error before -> after | prune s |")
    print("|---|---|---|---|---|---|---|---|")
    order = {"C4": 0, "self": 1, "mix 50/50": 2}
    for preset, source, n, d in sorted(cells, key=lambda c: (c[0], order[c[1]], c[2])):
        e = (d.get("reconstruction") or {}).get("error") or {}
        ppl = d["perplexity"]
        err = lambda k: f"{e.get(k + '_before', float('nan')):.4f} -> {e.get(k + '_after', float('nan')):.4f}"  # noqa: E731
        print(f"| {preset} | {source} | {n} | {ppl['wikitext2']:.2f} | {ppl['c4']:.2f} | {err('calib')} | {err('heldout')} | "
              f"{d.get('timing', {}).get('prune_s', 0):.0f} |")


GRID = re.compile(r"^(magnitude|wanda|sparsegpt)-(lr|br-gp|attn-mlp-gp)-sp(0\.[67])(-owl)?(-losstoken-mse-guardrevert)?(?:-zs\d+)?(-cuda)?$")


def sparsity_grid(runs: list[dict]) -> None:
    """Issue 13, part 2: {magnitude, Wanda, SparseGPT} x {LR, BR+GP, attn-mlp+GP} at 60% and 70%, each
    without and with OWL, as one matrix; a cell not measured yet says so. Reconstruction cells are
    token-mse with the guard on (revert), as the 70% cells first run on the GPU were. Where a cell ran on
    both devices the CPU run is shown (equal at 50%; Wanda LR at 70% differs by 7%, as BENCHMARKS.md says)."""
    cells: dict[tuple[str, str, str, bool], dict] = {}
    for d in runs:
        m = GRID.match(d["run"])
        if not m or (m.group(2) != "lr" and not m.group(5)):
            continue
        key = (m.group(3), m.group(1), m.group(2), bool(m.group(4)))
        if key not in cells or not m.group(6):
            cells[key] = d
    if not cells:
        return
    print("\n### 60% and 70% unstructured, without and with OWL (C4 calibration, 128 windows)\n")
    print("WikiText-2 / C4 perplexity (16 x 512 tokens); reconstruction: token-mse, guard revert, lr 2e-4. "
          "'-' not measured yet; (gpu) ran on a lent GPU under the same protocol.\n")
    print("| sparsity | criterion | preset | no OWL | OWL (M=5, lambda=0.08) | OWL change (WikiText-2) |")
    print("|---|---|---|---|---|---|")

    def cell(d: dict | None) -> str:
        if d is None:
            return "-"
        ppl = d["perplexity"]
        where = " (gpu)" if d["protocol"].get("device", "cpu") != "cpu" else ""
        return f"{ppl['wikitext2']:.2f} / {ppl['c4']:.2f}{where}"

    for sp in ("0.6", "0.7"):
        for crit in ("magnitude", "wanda", "sparsegpt"):
            for preset in ("lr", "br-gp", "attn-mlp-gp"):
                a, b = cells.get((sp, crit, preset, False)), cells.get((sp, crit, preset, True))
                change = f"{100 * (b['perplexity']['wikitext2'] / a['perplexity']['wikitext2'] - 1):+.0f}%" if a and b else "-"
                print(f"| {int(float(sp) * 100)}% | {crit} | {preset} | {cell(a)} | {cell(b)} | {change} |")


def main() -> None:
    runs = []
    for path in sorted(RESULTS.glob("*.json")):
        name = path.stem
        if not (MARKS.search(name) or name in REFERENCE):
            continue
        d = json.loads(path.read_text())
        if "protocol" in d and ("perplexity" in d or "zeroshot" in d):
            runs.append(d)
    print("Protocol cpu-recon-v2 (128 C4 windows of 256 tokens, 13 held out; 2 epochs at batch 1, lr 2e-4; "
          "WikiText-2 and C4 perplexity on 16 windows of 512 tokens). Sparsity: target / measured over "
          "the pruned linears (row-wise rounding).\n")
    print("| run | device | sparsity | OWL | WikiText-2 | C4 | prune s | peak GPU GiB | peak RSS GiB | windows reverted | zero-shot mean % |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for d in sorted(runs, key=lambda d: (d.get("sparsity", {}).get("target", 0), d["run"])):
        print(row(d))
    sparsity_grid(runs)
    free_lunch_table(runs)
    calib_table(runs)


if __name__ == "__main__":
    main()
