"""Human-readable summaries of a run: the terminal summary and ``report.md``."""

from __future__ import annotations

from typing import Any

from .config import recon_label


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
    for section in ("reconstruction", "retrain"):
        guard = (metrics.get(section) or {}).get("guard")
        if guard and guard.get("summary"):
            lines.append(guard["summary"])
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
    if "precision" in s:  # runs before --precision existed ran fp32 with float32 streams
        asked = f" (--precision {s['precision_setting']})" if s.get("precision_setting", s["precision"]) != s["precision"] else ""
        out.append(f"| precision | {s['precision']}{asked} |")
        out.append(f"| stream dtype | {s.get('stream_dtype', 'float32')} |")
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
    owl = sp.get("owl")
    if owl:
        out.append(
            f"| OWL (M {owl['m']:g}, lambda {owl['lam']:g}) block sparsities | "
            + ", ".join(f"{f:.3f}" for f in owl["sparsities"]) + " |"
        )
        out.append("| OWL block outlier ratios | " + ", ".join(f"{r:.4f}" for r in owl["ratios"]) + " |")
    for key, value in metrics["timing"].items():
        out.append(f"| {key.replace('_s', '')} time | {value:.1f} s |")
    out.append(f"| peak memory (RSS) | {metrics['peak_rss_mb']:.0f} MB |")
    if metrics.get("peak_gpu_mb"):
        out.append(f"| peak GPU memory | {metrics['peak_gpu_mb']:.0f} MB |")
    if metrics.get("zeroshot_markdown"):
        out += ["", "## Zero-shot accuracy", "", metrics["zeroshot_markdown"]]
    rec = metrics.get("reconstruction")
    if rec:
        r = rec["settings"]
        e = rec["error"]
        fmt = lambda v: "-" if v is None else f"{v:.4f}"  # noqa: E731
        out += [
            "",
            "## Reconstruction",
            "",
            f"Preset `{recon_label(r)}`: granularity {r['granularity']}, inputs {r['inputs']}, targets {r['targets']}, "
            f"window {r['window']} / stride {r['stride']}, {r['epochs']} epochs, lr {r['lr']}, "
            f"step batch {r.get('recon_batch_size') or 'as --batch-size'}, solver {r['solver']}"
            + (f", LoRA rank {r['lora_rank']}" if r["lora_rank"] else "")
            + f"; loss {r.get('loss', 'mse')}"
            + (f" without the first {r['loss_skip']} positions" if r.get("loss_skip") else "")
            + f"; {rec['heldout_windows']} calibration windows held out"
            + (f"; precision {s['precision']}, activation streams stored as {s.get('stream_dtype', 'float32')}"
               if "precision" in s else "")
            + ".",
            "",
            "Mean over units of the normalised error ‖y_dense − y_sparse‖² / ‖y_dense‖² (aggregate) and of "
            "the per-token normalised error (every token weighs the same):",
            "",
            "| data | aggregate before | aggregate after | per-token before | per-token after |",
            "|---|---|---|---|---|",
            f"| calibration | {fmt(e['calib_before'])} | {fmt(e['calib_after'])} | "
            f"{fmt(e.get('calib_token_before'))} | {fmt(e.get('calib_token_after'))} |",
            f"| held-out | {fmt(e['heldout_before'])} | {fmt(e['heldout_after'])} | "
            f"{fmt(e.get('heldout_token_before'))} | {fmt(e.get('heldout_token_after'))} |",
        ]
        if e.get("first_token_share_max") is not None:
            out.append(
                f"\nThe first position holds up to {e['first_token_share_max']:.0%} of a unit's target squared norm "
                "(held-out windows): that much of a plain MSE is spent on one token."
            )
        guard = rec.get("guard")
        if guard:
            out += ["", "### Guard", "", guard["summary"] + f" (guard time {guard['seconds']:.1f} s)."]
            worse = [w for w in guard["windows"] if w["worse"]]
            if worse:
                out += ["", "| window (blocks) | per-token error masks-only | reconstructed | reverted |", "|---|---|---|---|"]
                out += [f"| {w['blocks']} | {w['lr']:.4f} | {w['recon']:.4f} | {w['reverted']} |" for w in worse]
        if rec.get("compute", {}).get("flops"):  # the figures a retraining run reports too, for side-by-side reading
            c = rec["compute"]
            out.append(f"\nTraining: {c['flops']:.3g} FLOPs (linears, forward + backward) in {c['train_s']:.1f} s, {c['steps']} steps.")
        if "throughput" in rec:
            t = rec["throughput"]
            out.append(
                f"\nTraining ran at {t['train_gflops']:.1f} GFLOP/s, {t['fraction']:.0%} of the measured "
                f"float32 matmul rate ({t['matmul_gflops']:.1f} GFLOP/s)."
            )
        for plot in metrics.get("plots", []):
            out += ["", f"![{plot}]({plot})"]
    if metrics.get("retrain"):
        out += _retrain_markdown(metrics["retrain"], s)
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


def _retrain_markdown(rt: dict[str, Any], s: dict[str, Any]) -> list[str]:
    """The ``## Retraining`` section: settings, held-out loss per epoch, compute and memory, the guard."""
    fmt = lambda v, f="{:.4f}": "-" if v is None else f.format(v)  # noqa: E731
    c = rt["compute"]
    out = [
        "",
        "## Retraining",
        "",
        f"Preset `{recon_label(rt['settings'])}`: the whole pruned model trained end to end with its masks fixed, "
        f"loss {rt['loss']}, trained parameters: {rt['params']} ({rt['trainable_params']:,}), {rt['epochs_run']} of "
        f"{rt['epochs']} epochs, lr {rt['lr']}, {rt['batch_size']} windows per step, {rt['steps']} steps on "
        f"{rt['tokens']:,} tokens"
        + (f" from {rt['train_windows']} windows" if rt.get("train_windows") else "")
        + f"; {rt['heldout_windows']} calibration windows held out"
        + (f"; precision {s['precision']}" if "precision" in s else "")
        + ("; gradient checkpointing" if rt.get("gradient_checkpointing") else "") + ".",
        "",
        "| epoch | training loss | held-out loss |",
        "|---|---|---|",
        f"| before | - | {fmt(rt['heldout_before'])} |",
    ]
    for e, loss in enumerate(rt["loss_curve"]):
        held = rt["heldout_curve"][e] if e < len(rt["heldout_curve"]) else None
        out.append(f"| {e + 1} | {loss:.4f} | {fmt(held)} |")
    out.append(f"| end{' (reverted)' if rt['reverted'] else ''} | - | {fmt(rt['heldout_after'])} |")
    out += [
        "",
        "| compute and memory | value |",
        "|---|---|",
        f"| training FLOPs (linears and LM head, forward + backward) | {c['flops']:.3g} |",
        f"| training time | {c['train_s']:.1f} s |",
        f"| dense teacher / guard reference time | {c['teacher_s']:.1f} s ({c['teacher_flops']:.3g} FLOPs) |",
        f"| AdamW state | {c['optimizer_state_mb']:.1f} MB |",
        f"| peak host memory at the end of retraining | {c['peak_rss_mb']:.0f} MB |",
    ]
    if c.get("peak_gpu_mb") is not None:
        out.append(f"| peak GPU memory at the end of retraining | {c['peak_gpu_mb']:.0f} MB |")
    if "throughput" in rt:
        t = rt["throughput"]
        out.append(f"| throughput | {t['train_gflops']:.1f} GFLOP/s, {t['fraction']:.0%} of the measured matmul rate |")
    if rt.get("guard"):
        out += ["", "### Guard", "", rt["guard"]["summary"] + f" (guard time {rt['guard']['seconds']:.1f} s)."]
    return out


def _line_plot(lines: list[tuple[str, list, list, str]], path, xlabel: str, ylabel: str, title: str = "") -> bool:
    """One PNG with a line per ``(label, xs, ys, matplotlib format)`` on a log y axis; False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(8, 4))
    for label, xs, ys, fmt in lines:
        ax.plot(xs, ys, fmt, label=label)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_yscale("log")
    if title:
        ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def plot_unit_errors(units: list, path) -> bool:
    """Per-unit normalised error before/after reconstruction (calibration and held-out) as a PNG."""
    xs = list(range(len(units)))
    lines = []
    for key, fmt in (
        ("calib_before", "C0--"), ("calib_after", "C0-"), ("heldout_before", "C1--"), ("heldout_after", "C1-"),
        ("heldout_token_before", "C2--"), ("heldout_token_after", "C2-"),
    ):
        ys = [getattr(u, key) if getattr(u, key) is not None else float("nan") for u in units]
        lines.append((key.replace("_", " "), xs, ys, fmt))
    return _line_plot(lines, path, "unit (forward order)", "normalised error")


def plot_block_errors(runs: dict[str, Any], path, subtitle: str = "") -> bool:
    """Error at each block's output, one colour per run (the Rethinking paper's Figure 3).

    ``runs`` maps a name to a list of aggregate errors, or to :func:`prunekit.evaluate.block_errors`'
    dict: then the aggregate is drawn solid and the per-token error (every token weighs the same)
    dashed, so a model whose aggregate falls while every ordinary token gets worse shows it.
    """
    lines = []
    for i, (name, errs) in enumerate(runs.items()):
        if isinstance(errs, dict):
            xs = list(range(len(errs["aggregate"])))
            lines.append((f"{name} aggregate", xs, errs["aggregate"], f"C{i % 10}.-"))
            lines.append((f"{name} per-token", xs, errs["token"], f"C{i % 10}x--"))
        else:
            lines.append((name, list(range(len(errs))), errs, f"C{i % 10}.-"))
    return _line_plot(lines, path, "block", "normalised error vs dense (global propagation)", subtitle)


# ----------------------------------------------------------------------------- comparing runs


def load_run(directory) -> dict[str, Any]:
    """A run directory's metrics.json (and its name), for :func:`compare_runs`."""
    import json
    from pathlib import Path

    from .errors import PrunekitError

    d = Path(directory)
    path = d / "metrics.json"
    if not path.is_file():
        raise PrunekitError(f"{d} has no metrics.json; give run directories written by `prunekit prune`")
    try:
        metrics = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise PrunekitError(f"{path} is not valid JSON ({str(e).splitlines()[0]}); give run directories written by `prunekit prune`") from None
    if not isinstance(metrics, dict):
        raise PrunekitError(f"{path} is not a prunekit metrics file (not a JSON object); give run directories written by `prunekit prune`")
    metrics["_name"] = d.name
    metrics["_dir"] = str(d)
    try:  # the shape of what the comparison reads, so that a foreign file is one line, not a traceback
        comparison_rows([metrics])
        for u in metrics.get("reconstruction", {}).get("units", []):
            [float(v) for v in u.get("loss_curve", [])]
        [str(p) for p in metrics.get("plots", [])] + [str(n) for n in metrics.get("notes", [])]
    except (KeyError, TypeError, AttributeError, ValueError) as e:
        raise PrunekitError(
            f"{path} is not in prunekit's format ({type(e).__name__}: {e}); give run directories written by `prunekit prune`"
        ) from None
    return metrics


def _cell(value: Any, fmt: str = "{:.3f}") -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return fmt.format(value)
    return str(value)


def comparison_rows(runs: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the comparison table: settings, sparsity, perplexities, zero-shot, time, memory."""
    datasets = sorted({d for r in runs for d in r.get("perplexity", {})})
    tasks = sorted({t for r in runs for t in r.get("zeroshot", {}).get("tasks", {})})
    header = ["run", "method", "sparsity", "recon", "calib", "overall sparsity"]
    header += [f"ppl {d}" for d in datasets] + [f"{t} acc" for t in tasks]
    header += ["zero-shot mean", "calib error after", "held-out error after", "prune s", "peak MB"]
    rows = [_row(r, datasets, tasks) for r in runs]
    return header, rows


def _row(r: dict[str, Any], datasets: list[str], tasks: list[str]) -> list[str]:
    """One run's row of the comparison table (KeyError/TypeError when metrics.json is not prunekit's)."""
    s = r.get("settings", {})
    rec = r.get("reconstruction", {})
    err = rec.get("error", {})
    settings = (rec or r.get("retrain") or {}).get("settings", {"recon": "lr"})
    zs = r.get("zeroshot", {})
    row = [
        r["_name"], s.get("method", "-"), s.get("sparsity", "-"), recon_label(settings),
        f"{s.get('calib', '-')} {s.get('nsamples', '')}x{s.get('seqlen', '')}",
        _cell(r.get("sparsity", {}).get("overall"), "{:.4f}"),
    ]
    row += [_cell(r.get("perplexity", {}).get(d)) for d in datasets]
    for t in tasks:
        m = zs.get("tasks", {}).get(t)
        row.append("-" if m is None else _cell(m.get("acc_norm", m.get("acc")), "{:.4f}"))
    row += [
        _cell(zs.get("mean_acc"), "{:.4f}"), _cell(err.get("calib_after"), "{:.4f}"),
        _cell(err.get("heldout_after"), "{:.4f}"), _cell(r.get("timing", {}).get("prune_s"), "{:.1f}"),
        _cell(r.get("peak_rss_mb"), "{:.0f}"),
    ]
    return row


def plot_loss_curves(runs: list[dict[str, Any]], path) -> bool:
    """Mean training loss per epoch, averaged over a run's units, one line per run."""
    curves = {}
    for r in runs:
        units = r.get("reconstruction", {}).get("units", [])
        per_epoch: dict[int, list[float]] = {}
        for u in units:
            for e, v in enumerate(u.get("loss_curve", [])):
                per_epoch.setdefault(e, []).append(v)
        if per_epoch:
            curves[r["_name"]] = [sum(v) / len(v) for _, v in sorted(per_epoch.items())]
    lines = [(name, list(range(1, len(c) + 1)), c, "o-") for name, c in curves.items()]
    return _line_plot(lines, path, "epoch", "mean unit training loss (MSE)") if lines else False


def compare_runs(run_dirs: list[str], out_dir) -> tuple[str, str]:
    """Write ``report.md`` and ``report.html`` comparing runs into ``out_dir``; return both texts.

    ``out_dir`` is written atomically and never one of the runs (nor a folder holding other files):
    a comparison must not overwrite a run's own ``report.md``.
    """
    from pathlib import Path

    from .errors import PrunekitError
    from .rundir import RunDir

    runs = [load_run(d) for d in run_dirs]
    final = Path(out_dir).expanduser()
    for d in run_dirs:
        if final.resolve() == Path(d).expanduser().resolve():
            raise PrunekitError(f"--out {out_dir} is one of the runs compared; its own report.md would be overwritten: choose another --out")
    if final.exists():
        if not final.is_dir():
            raise PrunekitError(f"--out {final} is a file; choose a new directory")
        foreign = [f.name for f in final.iterdir() if f.name not in ("report.md", "report.html") and f.suffix != ".png"]
        if foreign:
            raise PrunekitError(
                f"--out {final} holds files that are not a prunekit comparison ({foreign[0]}); choose a new or empty directory"
            )
    header, rows = comparison_rows(runs)
    rundir = RunDir(final, overwrite=True)  # written into a hidden sibling, renamed at the end
    try:
        texts = _write_comparison(runs, rundir.tmp, header, rows)
        rundir.commit()
    except BaseException as e:
        rundir.discard()
        if isinstance(e, OSError):
            raise PrunekitError(f"cannot write the comparison to {final} ({e.strerror}); free some space or choose another --out") from None
        raise
    return texts


def _write_comparison(runs: list[dict[str, Any]], out, header: list[str], rows: list[list[str]]) -> tuple[str, str]:
    import html
    import shutil
    from pathlib import Path

    md = ["# prunekit: comparison of runs", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    md += ["| " + " | ".join(row) + " |" for row in rows]
    plots = []
    if plot_loss_curves(runs, out / "loss_curves.png"):
        plots.append(("Training loss per epoch", "loss_curves.png"))
    for r in runs:
        for p in r.get("plots", []):
            src = Path(r["_dir"]) / p
            if src.is_file():
                dst = f"{r['_name']}_{p}"
                shutil.copyfile(src, out / dst)
                plots.append((f"{r['_name']}: per-unit reconstruction error", dst))
    notes = [(r["_name"], n) for r in runs for n in r.get("notes", [])]
    if notes:
        md += ["", "## Notes", ""] + [f"- **{name}**: {n}" for name, n in notes]
    for title, p in plots:
        md += ["", f"## {title}", "", f"![{title}]({p})"]
    md.append("")
    esc = html.escape
    page = [
        "<!doctype html><meta charset='utf-8'><title>prunekit comparison</title>",
        "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}td:first-child{text-align:left}</style>",
        "<h1>prunekit: comparison of runs</h1><table><tr>" + "".join(f"<th>{esc(h)}</th>" for h in header) + "</tr>",
    ]
    page += ["<tr>" + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>" for row in rows]
    page.append("</table>")
    if notes:
        page.append("<h2>Notes</h2><ul>" + "".join(f"<li><b>{esc(n)}</b>: {esc(t)}</li>" for n, t in notes) + "</ul>")
    for title, p in plots:
        page.append(f"<h2>{esc(title)}</h2><img src='{esc(p)}' alt='{esc(title)}'>")
    md_text, html_text = "\n".join(md), "\n".join(page) + "\n"
    for name, text in (("report.md", md_text), ("report.html", html_text)):
        (out / name).write_text(text, encoding="utf-8")
    return md_text, html_text
