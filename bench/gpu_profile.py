"""Where the time of a 7B-shaped BR+GP block goes (issue 12): one configuration of bench/gpu.py
(default ``wanda-brgp-bf16``) run twice on the same model, first under cProfile (Python call tree,
cumulative wall time; CUDA work is charged to the calls that synchronise), then under
torch.profiler (self CPU and self CUDA time per operator). Written to ``OUT/profile.txt``.

The device benchmark (bench/gpu.py) found that at LLaMA-7B's shape a training step is mostly not
matmul and that the work around the steps (capture, masks, guard) outweighs the steps; this says
which calls to attack. Usage (CPU smoke test): ``python bench/gpu_profile.py --shape tiny``; on a
lent GPU: ``python bench/gpu_profile.py`` (about 2 minutes).
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gpu  # noqa: E402  (bench/gpu.py: shapes, model builder, one configuration's run)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="7b", choices=sorted(gpu.SHAPES))
    p.add_argument("--config", default="wanda-brgp-bf16")
    p.add_argument("--blocks", type=int, default=2)
    p.add_argument("--out", default=os.environ.get("OUT", "bench/results/gpu-profile"))
    p.add_argument("--skip-torch-profiler", action="store_true")
    args = p.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    shape = gpu.resolved_shape(gpu.SHAPES[args.shape], blocks=args.blocks)
    spec = next(s for s in gpu.specs() if s.name == args.config)
    model = gpu.build_model(shape)
    dense = {k: v.detach().clone() for k, v in model.state_dict().items()}
    ids = gpu.calib_ids(shape)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    lines: list[str] = [f"# profile of {spec.name}, shape {args.shape} ({shape.blocks} blocks, {shape.windows} x "
                        f"{shape.seqlen} tokens), device {torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}, "
                        f"torch {torch.__version__}\n"]

    def save() -> None:
        (out / "profile.txt").write_text("\n".join(lines))

    prof = cProfile.Profile()
    t = time.perf_counter()
    prof.enable()
    run = gpu.run_one(spec, model, ids, shape, device, 8, 1, {"fp32": None, "tf32": None, "bf16": None}, None)
    prof.disable()
    lines.append(f"## cProfile run: {time.perf_counter() - t:.1f} s, status {run['status']}, "
                 f"per block {[round(x, 2) for x in run['per_block_s']]}, timing {run.get('timing')}, "
                 f"step {run.get('step_s')}\n")
    for key, n in (("cumulative", 90), ("tottime", 40)):
        s = io.StringIO()
        pstats.Stats(prof, stream=s).sort_stats(key).print_stats(n)
        lines.append(f"### sorted by {key}\n```\n{s.getvalue()}\n```\n")
    save()
    print(f"[profile] cProfile done in {time.perf_counter() - t:.1f} s", flush=True)

    if args.skip_torch_profiler:
        return
    model.load_state_dict(dense)
    acts = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if device.type == "cuda" else [])
    t = time.perf_counter()
    with torch.profiler.profile(activities=acts) as tp:
        gpu.run_one(spec, model, ids, shape, device, 8, 1, {"fp32": None, "tf32": None, "bf16": None}, None)
    lines.append(f"## torch.profiler run: {time.perf_counter() - t:.1f} s\n")
    ka = tp.key_averages()
    sorts = ["self_cpu_time_total"] + (["self_cuda_time_total", "cuda_time_total"] if device.type == "cuda" else [])
    for key in sorts:
        lines.append(f"### sorted by {key}\n```\n{ka.table(sort_by=key, row_limit=45, max_name_column_width=70)}\n```\n")
    save()
    print(f"[profile] torch.profiler done in {time.perf_counter() - t:.1f} s; wrote {out / 'profile.txt'}", flush=True)


if __name__ == "__main__":
    main()
