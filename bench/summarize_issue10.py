"""Tables for the issue-10 runs (losses x guard under cpu-recon-v2; see bench/run_issue10.sh).

    python bench/summarize_issue10.py > bench/results/cpu-recon-v2/issue10.md

Each row: WikiText-2 / C4 perplexity at the protocol's 512-token windows, WikiText-2 at the
calibration length (256) and 4x it (1024), the share of the LR-to-dense WikiText-2 gap closed, the
guard's verdicts (windows reverted, end-to-end KL reconstructed vs masks-only) and its cost.
"""

from __future__ import annotations

import json
from pathlib import Path

R = Path(__file__).parent / "results" / "cpu-recon-v2"


def _load(name: str) -> dict | None:
    p = R / f"{name}.json"
    return json.loads(p.read_text()) if p.exists() else None


def _f(v, fmt="{:.2f}") -> str:
    return "-" if v is None else fmt.format(v)


def main() -> None:
    dense = _load("dense")["perplexity"]
    ctx_dense = _load("dense-ctx256+1024")
    rows = []
    header = (
        "| run | loss | WikiText-2 512 | C4 512 | WikiText-2 256 | WikiText-2 1024 | WT2 gap closed 512 / 256 / 1024 | "
        "windows reverted | end-to-end KL recon / masks-only | guard verdict | guard s / prune s |"
    )
    rows += [header, "|" + "---|" * (header.count("|") - 1)]
    names = sorted(p.stem for p in R.glob("*-ctx256+1024.json") if not p.stem.startswith("dense"))
    for name in names:
        d = _load(name)
        crit = name.split("-")[0]
        lr = _load(f"{crit}-lr-ctx256+1024") or _load(f"{crit}-lr")
        ppl = d["perplexity"]
        ctx = d.get("perplexity_by_seqlen", {})
        rec = d.get("reconstruction", {})
        g = rec.get("guard") or {}
        is_lr = "-lr-" in name
        loss = rec.get("settings", {}).get("loss", "-") if rec and not is_lr else "-"
        gaps = []
        if lr and not is_lr:
            lo = lr["perplexity"]["wikitext2"]
            gaps.append((lo - ppl["wikitext2"]) / (lo - dense["wikitext2"]))
            lr_ctx = lr.get("perplexity_by_seqlen", {})
            for k in ("256", "1024"):
                if k in lr_ctx and k in ctx and ctx_dense:
                    lo, d0 = lr_ctx[k]["ppl"], ctx_dense["perplexity_by_seqlen"][k]["ppl"]
                    gaps.append((lo - ctx[k]["ppl"]) / (lo - d0))
        gap = " / ".join(f"{g:.0%}" for g in gaps) if gaps else None
        e2e = g.get("end_to_end", {})
        kl = (
            f"{e2e['reconstructed']['kl']:.4f} / {e2e['masks_only']['kl']:.4f}" if e2e.get("compared") else "-"
        )
        reverted = f"{sum(w['reverted'] for w in g['windows'])} of {len(g['windows'])}" if g else "-"
        verdict = "-" if not g else ("whole run reverted" if e2e.get("reverted") else ("worse (kept)" if e2e.get("worse") else "kept"))
        t = d["timing"]
        cost = f"{t['guard_s']:.0f} / {t['prune_s']:.0f}" if "guard_s" in t else "-"
        rows.append(
            f"| {name} | {loss} | {_f(ppl['wikitext2'])} | {_f(ppl['c4'])} | {_f(ctx.get('256', {}).get('ppl'))} | "
            f"{_f(ctx.get('1024', {}).get('ppl'))} | {gap or '-'} | {reverted} | {kl} | {verdict} | {cost} |"
        )
    print(f"Dense: WikiText-2 {dense['wikitext2']:.2f} / C4 {dense['c4']:.2f} at 512 tokens", end="")
    if ctx_dense:
        c = ctx_dense["perplexity_by_seqlen"]
        print(f"; WikiText-2 {c['256']['ppl']:.2f} at 256, {c['1024']['ppl']:.2f} at 1024", end="")
    print(".\n")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
