"""Tables for the reconstruction benchmark (issue 3) from bench/results/PROTOCOL/*.json.

    python bench/summarize_recon.py [--protocol cpu-recon-v1]

Prints Markdown (and writes it to bench/results/PROTOCOL/summary.md): the grid with perplexities,
the share of the LR-to-dense perplexity gap each preset closes, calibration and held-out errors,
time, memory and training throughput; then the calibration-source/size study.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

CRITERIA = ("magnitude", "wanda", "sparsegpt")
PRESETS = ("lr", "br", "br-gp", "br-gp-cr", "attn-mlp-gp")


def _load(d: Path, name: str) -> dict | None:
    f = d / f"{name}.json"
    return json.loads(f.read_text()) if f.exists() else None


def _f(x: float | None, fmt: str = ".2f") -> str:
    return "–" if x is None else format(x, fmt)


def _gap(lr: float | None, x: float | None, dense: float | None) -> str:
    if None in (lr, x, dense) or lr == dense:
        return "–"
    return f"{100 * (lr - x) / (lr - dense):.0f}%"


def _dense_ppl(d: Path) -> dict[str, float]:
    dense = _load(d, "dense")
    return dense["perplexity"] if dense else {}


def grid(d: Path) -> list[str]:
    dppl = _dense_ppl(d)
    lines = []
    if dppl:
        lines.append(
            f"Dense: WikiText-2 {dppl['wikitext2']:.2f}, C4 {dppl['c4']:.2f} (same windows).\n"
        )
    lines += [
        "| criterion | preset | WikiText-2 | C4 | gap closed (wt2 / c4) | calib err before → after | held-out err before → after | recon s | total s | peak MB | train GFLOP/s (of matmul) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for crit in CRITERIA:
        lr = _load(d, f"{crit}-lr")
        for preset in PRESETS:
            r = _load(d, f"{crit}-{preset}")
            if r is None:
                lines.append(f"| {crit} | {preset} | not run | | | | | | | | |")
                continue
            p = r["perplexity"]
            rec = r.get("reconstruction", {})
            e = rec.get("error", {})
            th = rec.get("throughput")
            gaps = "–" if preset == "lr" or lr is None else (
                f"{_gap(lr['perplexity']['wikitext2'], p['wikitext2'], dppl.get('wikitext2'))} / "
                f"{_gap(lr['perplexity']['c4'], p['c4'], dppl.get('c4'))}"
            )
            thr = "–" if not th or preset == "lr" else f"{th['train_gflops']:.0f} of {th['matmul_gflops']:.0f} ({th['fraction']:.2f})"
            lines.append(
                f"| {crit} | {preset} | {p['wikitext2']:.2f} | {p['c4']:.2f} | {gaps} "
                f"| {_f(e.get('calib_before'), '.4f')} → {_f(e.get('calib_after'), '.4f')} "
                f"| {_f(e.get('heldout_before'), '.4f')} → {_f(e.get('heldout_after'), '.4f')} "
                f"| {_f(r['timing'].get('recon_s'), '.0f')} | {r['timing']['total_s']:.0f} | {r['peak_rss_mb']:.0f} | {thr} |"
            )
    return lines


def calib_study(d: Path, grid_n: int) -> list[str]:
    lines = [
        "| preset | calibration | windows | WikiText-2 | C4 | held-out err after | total s |",
        "|---|---|---|---|---|---|---|",
    ]
    names = sorted(p.stem for p in d.glob("wanda-*-*-*.json") if p.stem.rsplit("-", 2)[1] in ("c4", "self"))
    if not names:  # this protocol has no calibration study
        return []
    rows = []
    for name in names:
        base, calib, n = name.rsplit("-", 2)
        rows.append((base.removeprefix("wanda-"), calib, int(n), _load(d, name)))
    for preset in ("br-gp", "br-gp-cr"):
        g = _load(d, f"wanda-{preset}")
        if g is not None:
            rows.append((preset, "c4", grid_n, g))
    for preset, calib, n, r in sorted(rows, key=lambda t: (t[0], t[2], t[1])):
        p = r["perplexity"]
        e = r.get("reconstruction", {}).get("error", {})
        lines.append(
            f"| {preset} | {calib} | {n} | {p['wikitext2']:.2f} | {p['c4']:.2f} "
            f"| {_f(e.get('heldout_after'), '.4f')} | {r['timing']['total_s']:.0f} |"
        )
    return lines


def extra_runs(d: Path) -> list[str]:
    """Runs outside the protocol's settings (another learning rate or epoch count), each against its grid twin."""
    dppl = _dense_ppl(d)
    lines = [
        "| run | lr | epochs | WikiText-2 | C4 | gap closed (wt2 / c4) | same preset at the protocol's settings | held-out err after | total s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for f in sorted(f for f in d.glob("*-lr*.json") if re.search(r"-lr\d", f.stem)):
        r = json.loads(f.read_text())
        base = f.stem.rsplit("-lr", 1)[0]
        twin, lr = _load(d, base), _load(d, f"{base.split('-')[0]}-lr")
        p = r["perplexity"]
        e = r.get("reconstruction", {}).get("error", {})
        t = f"{twin['perplexity']['wikitext2']:.2f} / {twin['perplexity']['c4']:.2f}" if twin else "–"
        gaps = "–" if lr is None else " / ".join(
            _gap(lr["perplexity"][k], p[k], dppl.get(k)) for k in ("wikitext2", "c4")
        )
        lines.append(
            f"| {f.stem} | {r['protocol'].get('lr')} | {r['protocol'].get('epochs')} | {p['wikitext2']:.2f} | {p['c4']:.2f} "
            f"| {gaps} | {t} | {_f(e.get('heldout_after'), '.4f')} | {r['timing']['total_s']:.0f} |"
        )
    return lines if len(lines) > 2 else []


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--protocol", default="cpu-recon-v1")
    ap.add_argument("--grid-n", type=int, default=16, help="the grid's calibration size (its c4 runs join the study)")
    a = ap.parse_args()
    d = Path(__file__).parent / "results" / a.protocol
    text = "\n".join(
        [f"### Grid ({a.protocol}, 50% unstructured, C4 calibration)", ""]
        + grid(d)
        + (["", "### Calibration source and size (Wanda)", ""] + study if (study := calib_study(d, a.grid_n)) else [])
        + (["", "### Extra runs", ""] + extra if (extra := extra_runs(d)) else [])
    )
    print(text)
    (d / "summary.md").write_text(text + "\n")


if __name__ == "__main__":
    main()
