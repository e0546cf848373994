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
    rec = metrics.get("reconstruction")
    if rec:
        r = rec["settings"]
        e = rec["error"]
        fmt = lambda v: "-" if v is None else f"{v:.4f}"  # noqa: E731
        out += [
            "",
            "## Reconstruction",
            "",
            f"Preset `{r['recon']}`: granularity {r['granularity']}, inputs {r['inputs']}, targets {r['targets']}, "
            f"window {r['window']} / stride {r['stride']}, {r['epochs']} epochs, lr {r['lr']}, solver {r['solver']}"
            + (f", LoRA rank {r['lora_rank']}" if r["lora_rank"] else "")
            + f"; {rec['heldout_windows']} calibration windows held out.",
            "",
            "Mean normalised error ‖y_dense − y_sparse‖² / ‖y_dense‖² over units:",
            "",
            "| data | before | after |",
            "|---|---|---|",
            f"| calibration | {fmt(e['calib_before'])} | {fmt(e['calib_after'])} |",
            f"| held-out | {fmt(e['heldout_before'])} | {fmt(e['heldout_after'])} |",
        ]
        if "throughput" in rec:
            t = rec["throughput"]
            out.append(
                f"\nTraining ran at {t['train_gflops']:.1f} GFLOP/s, {t['fraction']:.0%} of the measured "
                f"float32 matmul rate ({t['matmul_gflops']:.1f} GFLOP/s)."
            )
        for plot in metrics.get("plots", []):
            out += ["", f"![{plot}]({plot})"]
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


def plot_unit_errors(units: list, path) -> bool:
    """Per-unit normalised error before/after reconstruction (calibration and held-out) as a PNG."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    xs = list(range(len(units)))
    fig, ax = plt.subplots(figsize=(8, 4))
    for key, style in (("calib_before", "C0--"), ("calib_after", "C0-"), ("heldout_before", "C1--"), ("heldout_after", "C1-")):
        ys = [getattr(u, key) if getattr(u, key) is not None else float("nan") for u in units]
        ax.plot(xs, ys, style, label=key.replace("_", " "))
    ax.set_xlabel("unit (forward order)")
    ax.set_ylabel("normalised error")
    ax.set_yscale("log")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def plot_block_errors(runs: dict[str, list[float]], path, subtitle: str = "") -> bool:
    """Normalised error at each block's output, one line per run (the Rethinking paper's Figure 3)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(8, 4))
    for name, errs in runs.items():
        ax.plot(range(len(errs)), errs, marker=".", label=name)
    ax.set_xlabel("block")
    ax.set_ylabel("normalised error vs dense (global propagation)")
    ax.set_yscale("log")
    ax.set_title(subtitle, fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True
