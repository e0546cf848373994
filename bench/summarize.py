"""Print the cpu-v1 results (bench/results/cpu-v1/*.json) as a Markdown table beside the reference points."""

from __future__ import annotations

import json
from pathlib import Path

ORDER = ["dense", "magnitude-50", "wanda-50", "sparsegpt-50", "magnitude-2-4", "wanda-2-4", "sparsegpt-2-4"]
# The original authors' algorithms run on this machine under the same protocol (issue 2):
# WikiText-2 perplexity first 128 / all windows, pruning wall time in seconds.
REFERENCE = {
    "dense": (30.47, 30.21, None),
    "magnitude-50": (600.0, 575.6, 10.0),
    "wanda-50": (70.36, 69.81, 182.0),
    "sparsegpt-50": (65.15, 65.48, 234.0),
}


def _f(x: float | None, fmt: str = "{:.2f}") -> str:
    return "-" if x is None else fmt.format(x)


def table(results_dir: Path) -> str:
    rows = {p.stem: json.loads(p.read_text()) for p in results_dir.glob("*.json")}
    timing = {p.stem: json.loads(p.read_text()) for p in (results_dir / "timing").glob("*.json")}
    lines = [
        "| run | ppl first 128 | ppl all (windows) | reference first 128 / all | Δ vs reference (all) "
        "| prune time (s) | quiet re-time (s) | reference time (s) | peak RSS (MB) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name in ORDER + sorted(set(rows) - set(ORDER)):
        if name not in rows:
            continue
        r = rows[name]
        ref = REFERENCE.get(name)
        delta = f"{(r['wikitext2_ppl_all'] / ref[1] - 1) * 100:+.1f}%" if ref else "-"
        quiet = timing.get(name, {}).get("prune_s")
        lines.append(
            f"| {name.replace('-2-4', ' 2:4').replace('-50', ' 50%')} | {r['wikitext2_ppl_first128']:.2f} "
            f"| {r['wikitext2_ppl_all']:.2f} ({r['eval_windows']}) "
            f"| {f'{ref[0]:.2f} / {ref[1]:.2f}' if ref else '-'} | {delta} "
            f"| {_f(r.get('prune_s'), '{:.0f}')} | {_f(quiet, '{:.0f}')} | {_f(ref[2] if ref else None, '{:.0f}')} "
            f"| {r['peak_rss_mb']:.0f} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    print(table(Path(__file__).parent / "results" / "cpu-v1"))
