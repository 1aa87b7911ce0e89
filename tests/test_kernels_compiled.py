"""The kernels as the installed Triton compiles them for a Hopper GPU (sm_90; no GPU needed,
scripts/inspect_kernels.py). kernels/scan.py: the layout their speed rests on, a channel per lane with all its
states, holds in the token loops. Neither loop moves data through shared memory or spills, the forward shuffles
nothing, and each backward loop shuffles only for its channel sum (dC in the recompute, dB in the reverse loop:
N = 16 each). Triton 3.6 once built these loops with 16 lanes per channel and 128 shuffles per forward step
(docs/efficiency.md, section 2.11). kernels/fusion.py: the matching's score tile runs on tensor cores (with float32
FMA dot products it took 2080 FFMA and twice the time; section 2.12)."""
import json
import os
import subprocess
import sys

import pytest

import ssm_ops

pytestmark = pytest.mark.skipif(not ssm_ops.TRITON_AVAILABLE, reason="needs Triton")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_scan_token_loops_keep_a_channel_per_lane(dtype):
    out = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "inspect_kernels.py"), "--dtype", dtype,
                          "--json"], capture_output=True, text=True, check=True, cwd=ROOT).stdout
    fwd, bwd = (json.loads(line) for line in out.splitlines())
    assert fwd["spill_bytes"] == 0 and bwd["spill_bytes"] == 0
    assert len(fwd["loops"]) == 1
    for loop in fwd["loops"] + bwd["loops"]:
        assert all(loop[op] == 0 for op in ("BAR", "LDS", "STS", "LDSM", "STSM", "LDL", "STL")), loop
    assert fwd["loops"][0]["SHFL"] == 0
    # the recompute and gradient loops shuffle only for the channel sums; 16-bit sequences' pieces add a loop
    # that advances the kept state
    assert [loop["SHFL"] for loop in bwd["loops"]] == {"fp32": [16, 16], "bf16": [0, 16, 16]}[dtype]


@pytest.mark.parametrize("dtype, products", [("fp32", 6), ("bf16", 1)])
def test_fusion_map_scores_run_on_tensor_cores(dtype, products):
    out = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "inspect_kernels.py"), "--kernel", "fusion_map",
                          "--dtype", dtype, "--json"], capture_output=True, text=True, check=True, cwd=ROOT).stdout
    report = json.loads(out)
    # per 32-channel step of the loop: two 16-deep tensor-core instructions per product, float32 rows taking
    # bf16x6's six products
    assert report["HGMMA"] + report["HMMA"] >= 2 * products, report
    assert report["FFMA"] < 100, report
