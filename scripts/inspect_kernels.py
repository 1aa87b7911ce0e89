"""The scan kernels as the installed Triton compiles them for a Hopper GPU (sm_90), without one: registers,
spills, and per innermost loop (one token step) the instruction count and the instructions that would break
kernels/scan.py's layout (shared memory, barriers, shuffles: a loop should have only the channel sums'
shuffles). This is how the layout Triton 3.6 built was found (docs/efficiency.md, section 2.11). With
``--kernel fusion_map``: kernels/fusion.py's matching kernel as fusion_map launches it for 197 tokens, and the
instructions that say where its score tile's dot products run (tensor cores: HGMMA / HMMA; float32 FMA: FFMA).

    python scripts/inspect_kernels.py [--kernel scan|fusion_map] [--dtype fp32|bf16] [--json]

The scan kernels are compiled as launched (no argument specialised; Vim-Ti's 384 channels per direction,
d_state 16), so the numbers are those of the kernels that run.
"""
import argparse
import json
import os
import re
import subprocess
import sys
import tempfile

os.environ.pop("TRITON_INTERPRET", None)   # the real compiler, also under the CPU tests
import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from kernels import fusion, scan  # noqa: E402

WATCH = ("SHFL", "BAR", "LDS", "STS", "LDSM", "STSM", "LDL", "STL")
CONSTEXPRS = dict(E=384, N=16, LOG_N=4, BD=scan.CHANNELS, S=scan.STATE_CHUNK, PTX=True)
TORCH = {"fp32": torch.float32, "bf16": torch.bfloat16}
SEQUENCES = ("u_ptr", "delta_ptr", "z_ptr", "dout_z_ptr", "du_ptr", "ddelta_ptr", "dz_ptr", "out_z_ptr")


def compile_sm90(kernel, dtype):
    names = kernel.arg_names
    signature = {n: "constexpr" if n in CONSTEXPRS else ("*" + (dtype if n in SEQUENCES else "fp32"))
                 if n.endswith("_ptr") else "i32" for n in names}
    values = dict(CONSTEXPRS, T=scan.PIECE[TORCH[dtype].itemsize])   # the backward's piece, as scan_bwd picks it
    constexprs = {(names.index(n),): v for n, v in values.items() if n in names}
    return triton.compile(ASTSource(kernel, signature, constexprs=constexprs), target=GPUTarget("cuda", 90, 32),
                          options=dict(num_warps=1))


def _sass(compiled):
    tools = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(compiled.asm["cubin"])
        cubin.flush()
        return subprocess.run([os.path.join(tools, "cuobjdump"), "-sass", cubin.name], capture_output=True,
                              text=True, check=True).stdout


def inspect_fusion_map(dtype):
    """fusion_map's kernel for 197 tokens of ``dtype`` rows (a 128 x 128 score tile, 8 warps, the class token at a
    fixed position), with the dot products fusion_map asks for on the GPU -> instruction counts."""
    kernel = fusion._fusion_map_kernel
    names = kernel.arg_names
    constexprs = dict(CLS_MODE=1, BA=128, BB=128, BC=32, DOT=fusion.DOT_PRECISION[TORCH[dtype]])
    signature = {n: "constexpr" if n in constexprs else ("*" + (dtype if n == "x_ptr" else
                 "fp32" if n == "weight_ptr" else "i64")) if n.endswith("_ptr") else "i32" for n in names}
    compiled = triton.compile(ASTSource(kernel, signature, constexprs={(names.index(n),): v
                                                                       for n, v in constexprs.items()}),
                              target=GPUTarget("cuda", 90, 32), options=dict(num_warps=8))
    ops = [re.sub(r"^@!?U?P\w+\s+", "", op).split()[0].split(".")[0]
           for op in re.findall(r"/\*[0-9a-f]{4,}\*/\s+([^;]*);", _sass(compiled))]
    return dict(kernel=kernel.__name__, dtype=dtype, triton=triton.__version__, dot=constexprs["DOT"],
                instructions=len(ops), **{w: ops.count(w) for w in ("HGMMA", "HMMA", "FFMA")})


def innermost_loops(sass):
    """SASS text -> instruction lists of the loops (backward branches) that contain no other loop."""
    code = [(int(a, 16), op) for a, op in re.findall(r"/\*([0-9a-f]{4,})\*/\s+([^;]*);", sass)]
    index = {a: i for i, (a, _) in enumerate(code)}
    loops = []
    for i, (a, op) in enumerate(code):
        target = re.search(r"BRA\s.*?0x([0-9a-f]+)", op)
        if target and int(target.group(1), 16) < a and int(target.group(1), 16) in index:
            loops.append((index[int(target.group(1), 16)], i))
    inner = [(s, e) for s, e in loops if not any(s <= s2 and e2 <= e and (s2, e2) != (s, e) for s2, e2 in loops)]
    return [[re.sub(r"^@!?U?P\w+\s+", "", op).split()[0] for _, op in code[s:e + 1]] for s, e in inner]


def inspect_kernel(kernel, dtype):
    compiled = compile_sm90(kernel, dtype)
    tools = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(compiled.asm["cubin"])
        cubin.flush()
        sass = subprocess.run([os.path.join(tools, "cuobjdump"), "-sass", cubin.name], capture_output=True,
                              text=True, check=True).stdout
        usage = subprocess.run([os.path.join(tools, "cuobjdump"), "-res-usage", cubin.name], capture_output=True,
                               text=True, check=True).stdout
    loops = [dict(instructions=len(ops), **{w: sum(op.split(".")[0] == w for op in ops) for w in WATCH})
             for ops in innermost_loops(sass)]
    return dict(kernel=kernel.__name__, dtype=dtype, triton=triton.__version__,
                registers=int(re.search(r"REG:(\d+)", usage).group(1)),
                spill_bytes=int(re.search(r"LOCAL:(\d+)", usage).group(1)), loops=loops)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--kernel", choices=("scan", "fusion_map"), default="scan")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32", help="the sequences' (rows') dtype")
    p.add_argument("--json", action="store_true", help="one JSON object per kernel instead of the table")
    args = p.parse_args()
    if args.kernel == "fusion_map":
        report = inspect_fusion_map(args.dtype)
        print(json.dumps(report) if args.json else
              f"{report['kernel']} ({args.dtype} rows, DOT {report['dot']}, Triton {report['triton']}, sm_90): "
              f"{report['instructions']} instructions, HGMMA {report['HGMMA']}, HMMA {report['HMMA']}, "
              f"FFMA {report['FFMA']}")
        return
    for kernel in (scan._scan_fwd_kernel, scan._scan_bwd_kernel):
        report = inspect_kernel(kernel, args.dtype)
        if args.json:
            print(json.dumps(report))
            continue
        print(f"{report['kernel']} ({args.dtype}, Triton {report['triton']}, sm_90): {report['registers']} "
              f"registers, {report['spill_bytes']} bytes spilled")
        for loop in report["loops"]:
            print(f"  loop: {loop['instructions']} instructions, "
                  + ", ".join(f"{w} {loop[w]}" for w in WATCH))


if __name__ == "__main__":
    main()
