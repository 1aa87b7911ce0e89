"""Token fusion's kernels (token_fusion.fuse): the matching and fusion map in one program per sample, and the
merge of the streams (its linear map and that map's transpose) in one pass each. token_fusion's torch functions
are the reference they are tested against."""
import torch
import triton
import triton.language as tl

from kernels.launch import INTERPRETED, Launcher, cdiv, next_power_of_2, row_block


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
DOT_PRECISION = {torch.float32: "fp32" if INTERPRETED else "bf16x6",
                 torch.bfloat16: "fp32" if INTERPRETED else "native",
                 torch.float16: "fp32" if INTERPRETED else "native"}


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
    # channels: 197 tokens 22 us on 8 warps, 47 on 4; 127 tokens 12 us on 4, 14 on 8)
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
        BA=max(16, next_power_of_2(na)), BB=max(16, next_power_of_2(nb)), BC=channels_per_step,
        DOT=dot_precision, num_warps=num_warps)
    return src, keep, dst_out, dest, weight, cls_out


# ----------------------------------------------------------------------------- token merge (token_fusion.merge)
# In torch the merge of one stream is a gather of the kept rows, a gather and an index_add of the fused rows and
# a broadcast division; its backward a division and a gather. Each is one pass here for two streams at once (the
# fusion's hidden and residual streams: one launch, the indices read once), and the division happens in float32
# before the single rounding to each stream's dtype.

@triton.jit
def _merge_rows_kernel(x_ptr, out_ptr, y_ptr, out_y_ptr, keep_ptr, src_ptr, dst_ptr, weight_ptr, T, T_OUT, R, C,
                       CY, TWO: tl.constexpr, COUNTS: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0)   # b * T_OUT + j
    b = row // T_OUT
    c = tl.arange(0, BLOCK)
    cx, cy = c < C, (c < CY) & TWO
    base = b.to(tl.int64) * T
    kept = base + tl.load(keep_ptr + row)
    acc = tl.load(x_ptr + kept * C + c, mask=cx).to(tl.float32)
    acc_y = tl.load(y_ptr + kept * CY + c, mask=cy).to(tl.float32)
    weight = tl.load(weight_ptr + row)
    searched = R
    if COUNTS:   # weight counts the rows merged into row j: where it is 1, none of the r fused rows lands here
        searched = tl.where(weight > 1.0, R, 0)
    for k in range(searched):   # the r fused rows of this sample that land on output row j
        hit = tl.load(dst_ptr + b * R + k) == row - b * T_OUT
        fused = base + tl.load(src_ptr + b * R + k)
        acc += tl.load(x_ptr + fused * C + c, mask=cx & hit, other=0.0).to(tl.float32)
        acc_y += tl.load(y_ptr + fused * CY + c, mask=cy & hit, other=0.0).to(tl.float32)
    out = row.to(tl.int64)
    tl.store(out_ptr + out * C + c, (acc / weight).to(out_ptr.dtype.element_ty), mask=cx)
    tl.store(out_y_ptr + out * CY + c, (acc_y / weight).to(out_y_ptr.dtype.element_ty), mask=cy)


_merge_rows = Launcher(_merge_rows_kernel)


@triton.jit
def _gather_rows_kernel(g_ptr, out_ptr, h_ptr, out_h_ptr, dest_ptr, weight_ptr, N_IN, T, T_OUT, C, CH,
                        TWO: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0) * ROWS + tl.arange(0, ROWS)   # b * T + i, of N_IN = B * T
    live = row < N_IN
    c = tl.arange(0, BLOCK)[None, :]
    cg, ch = (c < C) & live[:, None], (c < CH) & live[:, None] & TWO
    j = (row // T).to(tl.int64) * T_OUT + tl.load(dest_ptr + row, mask=live, other=0)
    weight = tl.load(weight_ptr + j, mask=live, other=1.0)[:, None]
    j = j[:, None]
    out = row.to(tl.int64)[:, None]
    g = tl.load(g_ptr + j * C + c, mask=cg).to(tl.float32) / weight
    tl.store(out_ptr + out * C + c, g.to(out_ptr.dtype.element_ty), mask=cg)
    h = tl.load(h_ptr + j * CH + c, mask=ch).to(tl.float32) / weight
    tl.store(out_h_ptr + out * CH + c, h.to(out_h_ptr.dtype.element_ty), mask=ch)


_gather_rows = Launcher(_gather_rows_kernel)

# The merge's transpose takes GATHER_ROWS input rows per program: with one row and one warp per program an H200 SM
# holds at most 32 programs, half its warps (batch 128, 192 channels, bfloat16 + float32 streams: 15.4 / 6.5 / 3.5 us
# at 197 / 120 / 40 tokens against 18.7 / 11.1 / 4.9 for one row; results/fusion_merge_h200.txt)
GATHER_ROWS, GATHER_WARPS = 4, 2


def _pairs(streams):
    """Streams (each (B, T, C_k), one B and T) two at a time, the odd one out with itself: what one launch takes."""
    streams = [t.contiguous() for t in streams]
    if any(t.shape[:2] != streams[0].shape[:2] for t in streams):
        raise ValueError(f"streams must share batch and length, got {[tuple(t.shape) for t in streams]}")
    return [(streams[i], streams[min(i + 1, len(streams) - 1)], i + 1 < len(streams))
            for i in range(0, len(streams), 2)]


def merge_rows(streams, keep, src, dst, weight, counts=False):
    """Each x (B, T, C_k) of ``streams`` -> (B, T', C_k): out[b, j] = (x[b, keep[b, j]] + sum over k with
    dst[b, k] = j of x[b, src[b, k]]) / weight[b, j]; keep (B, T'), src and dst (B, r) long, weight (B, T') or
    (B, T', 1) float32. ``counts``: weight[b, j] is the number of rows merged into row j (the plain mean), so that
    the many rows of weight 1 need not look through the fused rows (H200, batch 128, 192 channels, bfloat16 +
    float32 streams, r 7: 18.8 / 10.5 / 4.8 us at 197 / 120 / 40 tokens against 25.4 / 14.6 / 5.9;
    results/fusion_merge_h200.txt). Returns the list of merged streams."""
    bt, t = streams[0].shape[:2]
    t_out, r = keep.shape[1], src.shape[1]
    keep, src, dst, weight = keep.contiguous(), src.contiguous(), dst.contiguous(), weight.contiguous()
    outs = []
    for x, y, two in _pairs(streams):
        out = x.new_empty(bt, t_out, x.shape[2])
        out_y = y.new_empty(bt, t_out, y.shape[2]) if two else out
        _merge_rows[(bt * t_out,)](x, out, y, out_y, keep, src, dst, weight, t, t_out, r, x.shape[2], y.shape[2],
                                   TWO=two, COUNTS=counts, **row_block(max(x.shape[2], y.shape[2]), 256))
        outs += [out, out_y] if two else [out]
    return outs


def gather_rows(grads, dest, weight):
    """The merge's transpose, for each g (B, T', C_k) of ``grads``: -> (B, T, C_k), out[b, i] = g[b, dest[b, i]] /
    weight[b, dest[b, i]]; dest (B, T) long (the output row of each input row), weight (B, T') or (B, T', 1)
    float32. Returns the list of gathered gradients."""
    bt, t_out = grads[0].shape[:2]
    t = dest.shape[1]
    dest, weight = dest.contiguous(), weight.contiguous()
    outs = []
    for g, h, two in _pairs(grads):
        out = g.new_empty(bt, t, g.shape[2])
        out_h = h.new_empty(bt, t, h.shape[2]) if two else out
        _gather_rows[(cdiv(bt * t, GATHER_ROWS),)](
            g, out, h, out_h, dest, weight, bt * t, t, t_out, g.shape[2], h.shape[2], TWO=two, ROWS=GATHER_ROWS,
            BLOCK=next_power_of_2(max(g.shape[2], h.shape[2])), num_warps=GATHER_WARPS)
        outs += [out, out_h] if two else [out]
    return outs
