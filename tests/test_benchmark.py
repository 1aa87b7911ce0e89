"""benchmark.py on the CPU at a tiny size: the table's shape, and ratios computed from the measured numbers."""
import json

import pytest

import benchmark


def test_benchmark_table_and_ratios(tmp_path):
    out = tmp_path / "bench.json"
    args = benchmark.get_args_parser().parse_args([
        "--device", "cpu", "--depth", "2", "--embed-dim", "16", "--patch-size", "8", "--input-size", "32",
        "--batch-sizes", "2", "--steps", "2", "--warmup", "1", "--precisions", "fp32", "bf16",
        "--strategies", "none", "all:3", "upper:0:2", "--output", str(out)])
    results = benchmark.main(args)
    saved = json.loads(out.read_text())
    assert saved["results"] == results
    assert [r["strategy"] for r in results] == ["none", "all r3", "upper L0 r2"] * 2
    for r in results:
        base = next(b for b in results if b["precision"] == r["precision"] and b["strategy"] == "none")
        assert r["time_vs_none"] == pytest.approx(r["step_ms"] / base["step_ms"])
        assert r["images_per_s"] == pytest.approx(2 / r["step_ms"] * 1e3)
        assert r["step_ms_min"] <= r["step_ms"] <= r["step_ms_max"]
    # 17 tokens (16 patches + class token), depth 2: all r3 leaves 14 and 11, upper L0 r2 leaves 17 and 15
    assert [r["ideal"] for r in results[:3]] == pytest.approx([1.0, 25 / 34, 32 / 34])
    rows = [line for line in saved["table"].splitlines() if line.startswith("| Vim")]
    assert len(rows) == 6
    assert all(len(row.strip("|").split("|")) == 13 for row in rows)
    assert rows[1].split("|")[11].strip() == format(results[1]["time_vs_none"], ".3f")
    assert {r["ssm_backend"] for r in results} == {"torch"}  # 'auto' on the CPU
    assert {r["mode"] for r in results} == {"eager"}  # the CPU's default


def test_benchmark_ddp_eager_mode_joins_a_process_group_of_one():
    import torch.distributed as dist
    args = benchmark.get_args_parser().parse_args([
        "--device", "cpu", "--depth", "2", "--embed-dim", "16", "--patch-size", "8", "--input-size", "32",
        "--batch-sizes", "2", "--steps", "1", "--warmup", "1", "--modes", "eager", "ddp-eager",
        "--strategies", "none", "all:3"])
    try:
        results = benchmark.main(args)
        assert dist.is_initialized() and dist.get_world_size() == 1
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    assert [(r["mode"], r["world_size"]) for r in results] == [("eager", 1)] * 2 + [("ddp-eager", 1)] * 2
    for r in results:  # each mode's ratio against its own no-fusion run
        base = next(b for b in results if b["mode"] == r["mode"] and b["strategy"] == "none")
        assert r["time_vs_none"] == pytest.approx(r["step_ms"] / base["step_ms"])


@pytest.mark.parametrize("text, expected", [
    ("none", {"fusion_strategy": "no", "fusion_layer": 0, "fusion_token": 0}),
    ("lower:19:9", {"fusion_strategy": "lower", "fusion_layer": 19, "fusion_token": 9}),
    ("interleaved:14", {"fusion_strategy": "interleaved", "fusion_layer": 0, "fusion_token": 14}),
])
def test_parse_strategy(text, expected):
    assert benchmark.parse_strategy(text) == expected


@pytest.mark.parametrize("text", ["upper:9", "all", "lower:a:2", "sideways:3"])
def test_parse_strategy_rejects(text):
    with pytest.raises(Exception, match="expected"):
        benchmark.parse_strategy(text)


def test_kernel_times_count_each_kernel_once():
    """An eager step's profile lists each kernel twice: as the device's event and as the self device time of the
    host op that launched it. Only the device's events count (times in us over 2 steps)."""
    from types import SimpleNamespace as Event

    from torch.autograd import DeviceType
    events = [Event(key="aten::bmm", device_type=DeviceType.CPU, self_device_time_total=300.0, count=8),
              Event(key="gemm_kernel", device_type=DeviceType.CUDA, self_device_time_total=300.0, count=8),
              Event(key="Memset (Device)", device_type=DeviceType.CUDA, self_device_time_total=100.0, count=2),
              Event(key="aten::view", device_type=DeviceType.CPU, self_device_time_total=0.0, count=4),
              Event(key="idle_kernel", device_type=DeviceType.CUDA, self_device_time_total=0.0, count=2)]
    total, kernels = benchmark.kernel_times(events, steps=2)
    assert total == pytest.approx(0.2)   # (300 + 100) us / 2 steps
    assert kernels == {"gemm_kernel": [0.15, 4.0], "Memset (Device)": [0.05, 1.0]}
    assert list(kernels) == ["gemm_kernel", "Memset (Device)"]   # most expensive first


def test_an_uninstalled_kernel_backend_stops_the_benchmark_before_it_measures(tmp_path, monkeypatch):
    monkeypatch.setitem(benchmark.ssm_ops.KERNEL_BACKENDS, "cuda", (False, "mamba-ssm and causal-conv1d"))
    monkeypatch.setattr(benchmark, "measure", lambda *a: pytest.fail("measured before checking the backends"))
    args = benchmark.get_args_parser().parse_args(["--device", "cpu", "--ssm-backends", "torch", "cuda",
                                                   "--output", str(tmp_path / "b.json")])
    with pytest.raises(SystemExit, match="benchmark.py: error: --ssm-backends cuda: .*needs mamba-ssm"):
        benchmark.main(args)
