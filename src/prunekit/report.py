"""Human-readable summaries of a run: the terminal summary and ``report.md``."""

from __future__ import annotations

from typing import Any


def _fmt_s(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds:.1f} s"


def summary_lines(metrics: dict[str, Any]) -> list[str]:
    s = metrics["settings"]
    lines = [
        f"model      {s['model']}",
        f"pruned     {s['method']} to {s['sparsity']} ({metrics['sparsity']['overall']:.2%} of "
        f"{metrics['sparsity']['pruned_params']:,} linear weights), calibration {s['calib']} "
        f"{s['nsamples']}x{s['seqlen']}",
    ]
    for name, ppl in metrics["perplexity"].items():
        d = metrics["perplexity_detail"][name]
        lines.append(f"perplexity {name}: {ppl:.3f} ({d['windows']} windows of {d['seqlen']} tokens)")
    t = metrics["timing"]
    lines.append(
        f"time       prune {_fmt_s(t.get('prune_s'))}, eval {_fmt_s(t.get('eval_s'))}, total {_fmt_s(t.get('total_s'))}; "
        f"peak memory {metrics['peak_rss_mb']:.0f} MB"
    )
    return lines


def render_markdown(metrics: dict[str, Any]) -> str:
    s = metrics["settings"]
    sp = metrics["sparsity"]
    per_layer = sp["per_layer"]
    out = [
        f"# prunekit run: {s['method']} {s['sparsity']} on {s['model']}",
        "",
        "## Settings",
        "",
        "| setting | value |",
        "|---|---|",
    ]
    for key in ("model", "dtype", "method", "sparsity", "scope", "calib", "nsamples", "seqlen", "seed", "device"):
        out.append(f"| {key} | {s.get(key)} |")
    out += [
        "",
        "## Results",
        "",
        "| measure | value |",
        "|---|---|",
    ]
    for name, ppl in metrics["perplexity"].items():
        d = metrics["perplexity_detail"][name]
        out.append(f"| perplexity {name} ({d['windows']} x {d['seqlen']} tokens) | {ppl:.3f} |")
    out.append(f"| sparsity of pruned linears | {sp['overall']:.4f} ({sp['pruned_params']:,} weights) |")
    if per_layer:
        out.append(f"| per-layer sparsity min / max | {min(per_layer.values()):.4f} / {max(per_layer.values()):.4f} |")
    for key, value in metrics["timing"].items():
        out.append(f"| {key.replace('_s', '')} time | {value:.1f} s |")
    out.append(f"| peak memory (RSS) | {metrics['peak_rss_mb']:.0f} MB |")
    if metrics.get("peak_gpu_mb"):
        out.append(f"| peak GPU memory | {metrics['peak_gpu_mb']:.0f} MB |")
    if metrics.get("notes"):
        out += ["", "## Notes", ""] + [f"- {n}" for n in metrics["notes"]]
    out += [
        "",
        "The pruned model in this directory loads with "
        "`transformers.AutoModelForCausalLM.from_pretrained(<this directory>)`; "
        "`config.yaml` holds every setting of the run and `metrics.json` every number above.",
        "",
    ]
    return "\n".join(out)
