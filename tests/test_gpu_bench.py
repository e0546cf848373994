"""bench/gpu.py (the device benchmark, issue 12) end to end on the CPU with its tiny shape, so it stays working
between the sessions that are lent a GPU."""

from __future__ import annotations

import importlib.util
import json
import sys
import time
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "bench" / "gpu.py"


@pytest.fixture(scope="module")
def gpu():
    spec = importlib.util.spec_from_file_location("bench_gpu", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_gpu"] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop("bench_gpu", None)


def test_tiny_run_writes_every_field(gpu, tmp_path):
    out = tmp_path / "res"
    gpu.main(["--shape", "tiny", "--device", "cpu", "--default-model", "--out", str(out)])
    result = json.loads((out / "gpu.json").read_text())
    md = (out / "gpu.md").read_text()

    m = result["machine"]
    assert m["gpu"] is None and m["cpu_count"] >= 1 and m["torch"] == torch.__version__
    assert m["transformers"] and m["prunekit_commit"]
    rates = result["matmul"]["before"]
    assert rates["fp32"] > 0 and rates["bf16"] > 0 and rates["tf32"] is None  # TF32 exists only on CUDA
    assert result["matmul"]["after"]["fp32"] > 0
    assert "PROJECTION" in result["note"] and result["skipped"] == []

    runs = {r["name"]: r for r in result["configs"]}
    assert set(runs) == {s.name for s in gpu.specs()} and len(runs) == 11
    for name, r in runs.items():
        assert r["status"] == "done", (name, r.get("why"))
        assert len(r["per_block_s"]) == 2 and r["steady_block_s"] == r["per_block_s"][1] > 0
        assert r["peak_gpu_bytes"] is None and r["peak_rss_bytes"] > 0
        assert r["overall_sparsity"] == pytest.approx(0.5, abs=0.01)
        assert r["projection"]["total_s"] > 0 and r["projection"]["what"].startswith("PROJECTION")
        assert name in md
    # --precision tf32 runs as fp32 on a CPU, and the run says what ran
    assert runs["wanda-lr-tf32"]["precision_resolved"] == "fp32"
    assert runs["wanda-brgp-bf16"]["precision_resolved"] == "bf16"
    assert runs["wanda-brgp-bf16-streams"]["stream_dtype"] == "bfloat16"
    assert runs["wanda-brgp-bf16-hoststreams"]["offload"] == "ram"
    for name in ("wanda-brgp-fp32", "wanda-brgp-tf32", "wanda-brgp-bf16", "wanda-brgp-bf16-streams", "wanda-brgp-bf16-hoststreams"):
        r = runs[name]
        # 4 windows, 1 held out, 3 trained on at batch 8: one step per block, two blocks
        assert r["steps"] == 2 and r["last_unit"]["steps"] == 1 and r["last_unit"]["unit"] == "block 1"
        assert r["train_tflops"] > 0 and set(r["ratio_to_matmul"]) == {"fp32", "tf32", "bf16"}
        assert r["ratio_to_matmul"]["fp32"] == pytest.approx(r["train_tflops"] / rates["fp32"])
        assert r["step_s"] > 0 and r["overhead_per_step_s"] is not None
        p = r["projection"]
        assert p["steps_per_block"] == 320 and p["blocks"] == 32
        assert p["total_s"] == pytest.approx(p["train_s"] + p["other_s"])
    for name in ("wanda-lr-fp32", "sparsegpt-lr-bf16"):
        assert runs[name]["steps"] == 0 and "steps_per_block" not in runs[name]["projection"]

    # the steady column is the last block's own rate: FLOPs over seconds of that unit
    r = runs["wanda-brgp-bf16"]
    assert gpu._steady_tflops(r) == pytest.approx(r["last_unit"]["flops"] / r["last_unit"]["seconds"] / 1e12)
    # --render rewrites gpu.md from gpu.json alone (a table changed after a GPU run), to the same text
    (out / "gpu.md").unlink()
    gpu.main(["--render", str(out / "gpu.json")])
    assert (out / "gpu.md").read_text() == md

    dm = result["default_model"]
    assert dm["shape"]["hidden"] == 576 and dm["shape"]["kv_heads"] == 3
    assert [r["name"] for r in dm["runs"]] == ["default-brgp-bf16", "default-brgp-fp32"]
    assert all(r["status"] == "done" and r["projection"]["blocks"] == 30 for r in dm["runs"])
    assert "Default model's shape" in md


def test_budget_skips_and_records(gpu, tmp_path):
    out = tmp_path / "res"
    result = gpu.main(["--shape", "tiny", "--device", "cpu", "--budget-s", "0", "--default-model", "--out", str(out)])
    assert result["configs"] == []
    skipped = [s["name"] for s in result["skipped"]]
    assert skipped == [s.name for s in gpu.specs()] + ["default-brgp-bf16", "default-brgp-fp32"]
    assert json.loads((out / "gpu.json").read_text())["skipped"] == result["skipped"]


def test_run_over_budget_stops_after_a_block(gpu):
    shape = gpu.SHAPES["tiny"]
    model = gpu.build_model(shape)
    spec = gpu.RunSpec("wanda-brgp-fp32", "wanda", "br-gp", "fp32")
    rates = {"fp32": 1.0, "tf32": None, "bf16": 2.0}
    run = gpu.run_one(spec, model, gpu.calib_ids(shape), shape, torch.device("cpu"), 8, 1, rates, time.perf_counter())
    assert run["status"] == "stopped" and "1 of 2 blocks" in run["why"]
    assert len(run["per_block_s"]) == 1 and "projection" not in run
    assert all(p.device.type == "cpu" for p in model.parameters())


def test_unknown_configuration_is_refused(gpu, tmp_path):
    with pytest.raises(SystemExit, match="unknown configuration"):
        gpu.main(["--shape", "tiny", "--device", "cpu", "--configs", "wanda-brgp-fp16", "--out", str(tmp_path)])
