"""Token fusion's kernels (token_fusion.fuse): the matching and fusion map in one program per sample, and the
merge of a stream (its linear map and that map's transpose) in one pass each. token_fusion's torch functions
are the reference they are tested against."""
import os

import torch
import triton
import triton.language as tl

from kernels.launch import Launcher


# ----------------------------------------------------------------------------- token matching (token_fusion.fuse)
# In torch, bipartite matching and the fusion map it implies take about 30 small kernels per fused layer (normalise,
# score, mask the class token, max, two sorts, gathers, scatters, the group sizes). Here one program per sample
# does all of it for the paper's setting (output order "released", plain mean).

@triton.jit
def _fusion_map_kernel(x_ptr, cls_ptr, src_ptr, dst_ptr, keep_ptr, dest_ptr, weight_ptr, cls_out_ptr,
                       T, C, NA, NB, R, CLS, CLS_MODE: tl.constexpr, BA: tl.constexpr, BB: tl.constexpr,
                       BC: tl.constexpr, DOT: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    rows = x_ptr + b * T * C
    i = tl.arange(0, BA)   # A token i sits at position 2i
    j = tl.arange(0, BB)   # B token j at 2j + 1
    dots = tl.zeros([BA, BB], dtype=tl.float32)
    sq_a = tl.zeros([BA], dtype=tl.float32)
    sq_b = tl.zeros([BB], dtype=tl.float32)
    for c0 in range(0, C, BC):
        c = c0 + tl.arange(0, BC)
        a = tl.load(rows + (2 * i)[:, None] * C + c[None, :], mask=(i < NA)[:, None] & (c < C)[None, :], other=0.0)
        bt = tl.load(rows + (2 * j + 1)[:, None] * C + c[None, :], mask=(j < NB)[:, None] & (c < C)[None, :],
                     other=0.0)
        if DOT == "native":
            dots += tl.dot(a, tl.trans(bt))
        a, bt = a.to(tl.float32), bt.to(tl.float32)
        if DOT == "fp32":
            dots += tl.dot(a, tl.trans(bt), input_precision="ieee")
        elif DOT == "bf16x6":
            dots += tl.dot(a, tl.trans(bt), input_precision="bf16x6")
        sq_a += tl.sum(a * a, 1)
        sq_b += tl.sum(bt * bt, 1)
    # cosine similarity, each norm clamped as F.normalize does
    scores = dots / tl.maximum(tl.sqrt(sq_a), 1e-12)[:, None] / tl.maximum(tl.sqrt(sq_b), 1e-12)[None, :]
    if CLS_MODE == 0:
        cls = -1
    elif CLS_MODE == 1:
        cls = CLS
    else:
        cls = tl.load(cls_ptr + b)
    masked = ((j >= NB) | (2 * j + 1 == cls))[None, :] | (2 * i == cls)[:, None]
    scores = tl.where(masked, float("-inf"), scores)
    best = tl.where(i < NA, tl.max(scores, 1), float("-inf"))
    partner = tl.argmax(scores, 1)
    # rank by best score, descending; ties go to the earlier token (a stable sort)
    ahead = (best[None, :] > best[:, None]) | ((best[None, :] == best[:, None]) & (i[None, :] < i[:, None]))
    rank = tl.sum(ahead.to(tl.int32), 1)
    fused = rank < R
    kept = (i < NA) & (rank >= R)
    pos = tl.cumsum(kept.to(tl.int32), 0) - 1          # output row of a kept A token
    first_b = NA - R                                    # B tokens follow the kept A tokens
    into = first_b + partner                            # output row a fused A token lands in
    out = b * (T - R)
    tl.store(src_ptr + b * R + rank, (2 * i).to(tl.int64), mask=fused)
    tl.store(dst_ptr + b * R + rank, into.to(tl.int64), mask=fused)
    tl.store(keep_ptr + out + pos, (2 * i).to(tl.int64), mask=kept)
    tl.store(keep_ptr + out + first_b + j, (2 * j + 1).to(tl.int64), mask=j < NB)
    tl.store(dest_ptr + b * T + 2 * i, tl.where(fused, into, pos).to(tl.int64), mask=i < NA)
    tl.store(dest_ptr + b * T + 2 * j + 1, (first_b + j).to(tl.int64), mask=j < NB)
    landed = tl.sum(((partner[:, None] == j[None, :]) & fused[:, None]).to(tl.float32), 0)
    tl.store(weight_ptr + out + pos, tl.full([BA], 1.0, tl.float32), mask=kept)
    tl.store(weight_ptr + out + first_b + j, 1.0 + landed, mask=j < NB)
    if CLS_MODE != 0:   # the class token is never fused: a kept A token or a B token
        cls_pos = tl.sum(tl.where(2 * i == cls, pos, 0), 0)
        tl.store(cls_out_ptr + b, tl.where(cls % 2 == 0, cls_pos, first_b + cls // 2).to(tl.int64))


_fusion_map = Launcher(_fusion_map_kernel)


FUSION_MAP_MAX_TOKENS = 256  # a program holds the (T/2)^2 scores in registers: 128 x 128 at most
# How the scores' dot products run (the kernel's DOT): on tensor cores with float32 accumulation, 16-bit rows as
# they are ("native": their products are exact in float32) and float32 rows split into three bfloat16 parts
# ("bf16x6": six products, float32's 24 bits); "fp32" is float32 FMA on rows converted to float32, all that Triton's
# interpreter (the CPU tests) runs.
_INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"
DOT_PRECISION = {torch.float32: "fp32" if _INTERPRETED else "bf16x6",
                 torch.bfloat16: "fp32" if _INTERPRETED else "native",
                 torch.float16: "fp32" if _INTERPRETED else "native"}


def fusion_map(x, r, cls_index=None):
    """token_fusion's matching and fusion map for output order "released" and the plain mean, one program per
    sample. x (B, T, C) is the similarity metric; r tokens are fused; cls_index (int, (B,) long tensor or None)
    is never fused. Returns (src, keep, dst_out, dest, weight, cls_out) as token_fusion's torch path builds them:
    src (B, r) fused A positions ordered by their score, keep (B, T - r) source position of every output row,
    dst_out (B, r) output row each src token lands in, dest (B, T) output row of every input token, weight
    (B, T - r, 1) float32 group sizes, cls_out the class token's output row ((B,) long; None or 0 as given)."""
    x = x.contiguous()
    t = x.shape[1]
    na, nb = (t + 1) // 2, t // 2
    if not 0 < r <= nb:
        raise ValueError(f"can fuse 1..{nb} of {t} tokens, got r={r}")
    if t > FUSION_MAP_MAX_TOKENS:
        raise ValueError(f"fusion_map takes at most {FUSION_MAP_MAX_TOKENS} tokens, got {t}")
    # 8 warps for the 128 x 128 score tile (129-256 tokens), 4 for smaller ones (H200, 128 samples, 192 fp32
    # channels: 197 tokens 50 us on 8 warps, 119 on 4; 127 tokens 27 us on 4, 37 on 8)
    src, keep, dst_out, dest, weight, cls_out = launch_fusion_map(x, r, cls_index, 8 if na > 64 else 4, 32,
                                                                  DOT_PRECISION[x.dtype])
    static = cls_index is None or (isinstance(cls_index, int) and cls_index == 0)
    return src, keep, dst_out, dest, weight, cls_index if static else cls_out


def launch_fusion_map(x, r, cls_index, num_warps, channels_per_step, dot_precision):
    """fusion_map's kernel on contiguous x (B, T, C) with these launch settings and way of computing the scores' dot
    products (DOT_PRECISION's values; scripts/fusion_map_benchmark.py compares them) -> (src, keep, dst_out, dest,
    weight, cls_out), cls_out always the (B,) tensor."""
    bt, t, c = x.shape
    na, nb = (t + 1) // 2, t // 2
    long = dict(device=x.device, dtype=torch.long)
    src, dst_out, keep, dest = (torch.empty(bt, n, **long) for n in (r, r, t - r, t))
    weight = torch.empty(bt, t - r, 1, device=x.device, dtype=torch.float32)
    cls_out = torch.empty(bt, **long)
    mode = 0 if cls_index is None else 1 if isinstance(cls_index, int) else 2
    _fusion_map[(bt,)](
        x, cls_index.contiguous() if mode == 2 else cls_out, src, dst_out, keep, dest, weight, cls_out,
        t, c, na, nb, r, cls_index if mode == 1 else 0, CLS_MODE=mode,
        BA=max(16, triton.next_power_of_2(na)), BB=max(16, triton.next_power_of_2(nb)), BC=channels_per_step,
        DOT=dot_precision, num_warps=num_warps)
    return src, keep, dst_out, dest, weight, cls_out


# ----------------------------------------------------------------------------- token merge (token_fusion.merge)
# In torch the merge of one stream is a gather of the kept rows, a gather and an index_add of the fused rows and
# a broadcast division; its backward a division and a gather. Each is one pass here, and the division happens in
# float32 before the single rounding to the stream's dtype.

@triton.jit
def _merge_rows_kernel(x_ptr, out_ptr, keep_ptr, src_ptr, dst_ptr, weight_ptr, T, T_OUT, R, C,
                       BLOCK: tl.constexpr):
    row = tl.program_id(0)   # b * T_OUT + j
    b = row // T_OUT
    c = tl.arange(0, BLOCK)
    cm = c < C
    base = b.to(tl.int64) * T
    acc = tl.load(x_ptr + (base + tl.load(keep_ptr + row)) * C + c, mask=cm).to(tl.float32)
    for k in range(R):   # the r fused rows of this sample that land on output row j
        hit = tl.load(dst_ptr + b * R + k) == row - b * T_OUT
        src = tl.load(src_ptr + b * R + k)
        acc += tl.load(x_ptr + (base + src) * C + c, mask=cm & hit, other=0.0).to(tl.float32)
    out = acc / tl.load(weight_ptr + row)
    tl.store(out_ptr + row.to(tl.int64) * C + c, out.to(out_ptr.dtype.element_ty), mask=cm)


_merge_rows = Launcher(_merge_rows_kernel)


@triton.jit
def _gather_rows_kernel(g_ptr, out_ptr, dest_ptr, weight_ptr, T, T_OUT, C, BLOCK: tl.constexpr):
    row = tl.program_id(0)   # b * T + i
    c = tl.arange(0, BLOCK)
    cm = c < C
    j = (row // T).to(tl.int64) * T_OUT + tl.load(dest_ptr + row)
    g = tl.load(g_ptr + j * C + c, mask=cm).to(tl.float32) / tl.load(weight_ptr + j)
    tl.store(out_ptr + row.to(tl.int64) * C + c, g.to(out_ptr.dtype.element_ty), mask=cm)


_gather_rows = Launcher(_gather_rows_kernel)


def _row_block(c):
    block = triton.next_power_of_2(c)
    return dict(BLOCK=block, num_warps=max(1, min(block // 256, 8)))


def merge_rows(x, keep, src, dst, weight):
    """x (B, T, C) -> (B, T', C): out[b, j] = (x[b, keep[b, j]] + sum over k with dst[b, k] = j of x[b, src[b, k]])
    / weight[b, j]; keep (B, T'), src and dst (B, r) long, weight (B, T') or (B, T', 1) float32."""
    x = x.contiguous()
    bt, t, c = x.shape
    t_out, r = keep.shape[1], src.shape[1]
    out = torch.empty(bt, t_out, c, device=x.device, dtype=x.dtype)
    _merge_rows[(bt * t_out,)](x, out, keep.contiguous(), src.contiguous(), dst.contiguous(),
                                      weight.contiguous(), t, t_out, r, c, **_row_block(c))
    return out


def gather_rows(g, dest, weight):
    """The merge's transpose: g (B, T', C) -> (B, T, C), out[b, i] = g[b, dest[b, i]] / weight[b, dest[b, i]];
    dest (B, T) long (the output row of each input row), weight (B, T') or (B, T', 1) float32."""
    g = g.contiguous()
    bt, t_out, c = g.shape
    t = dest.shape[1]
    out = torch.empty(bt, t, c, device=g.device, dtype=g.dtype)
    _gather_rows[(bt * t,)](g, out, dest.contiguous(), weight.contiguous(), t, t_out, c, **_row_block(c))
    return out
