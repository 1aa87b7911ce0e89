"""Famba-V token fusion: bipartite soft matching (ToMe), merging, and the cross-layer strategy schedule.

Pure functions, kept apart from the model that calls them. Inside a fused layer (after the residual add
and RMSNorm, before the mixer) the same fusion map is applied to the normalised hidden states and to the
residual stream:

1. similarity = cosine of the normalised hidden states; set A = even positions, set B = odd positions;
2. each A token finds its most similar B token; the r A tokens with the highest best-similarity are fused
   into their B partners (matching runs without gradients, the fusion itself is differentiable);
3. fused value = plain mean of the B token and the A tokens merged into it (paper default), or ToMe's
   size-weighted mean (``mode="size"``);
4. output order ``"released"`` (paper): [unfused A tokens in their original order, then all B tokens];
   ``"spatial"``: every surviving token keeps its original relative position.

The class token is never fused, wherever it sits; its index after fusion is returned so the model can read
it out. The index is a Python int where it is known without looking at the data (a class token at position 0,
or none), else a (B,) long tensor.
On request fuse also carries a source map (ToMe's source trace, held as one group id per input token):
source[b, t] = the token that holds input token t now; each fusion composes it with its own map.
On CUDA the merge (step 3) runs as kernels/fusion.py's merge_rows / gather_rows, and in the paper's setting
(order "released", mode "mean", up to 256 tokens) steps 1-2 and the fusion map are its fusion_map; elsewhere
all is torch ops.
"""
import torch

try:  # the merge's CUDA kernels; the torch path below needs nothing else
    from kernels import fusion as fusion_kernels
except ImportError:
    fusion_kernels = None

STRATEGIES = ("no", "none", "all", "interleaved", "alternate", "lower", "upper")
_ALIASES = {"none": "no", "alternate": "interleaved"}
ORDERS = ("released", "spatial")
MODES = ("mean", "size")


# ----------------------------------------------------------------------------- schedule

def fusion_schedule(strategy, fusion_layer, fusion_token, depth):
    """Tokens requested for fusion in each of ``depth`` layers (0-indexed i), before capping.

    no/none: none; all: every layer; interleaved/alternate: odd i; lower: i < fusion_layer;
    upper: i > fusion_layer. The boundary layer itself is not fused; all/interleaved ignore fusion_layer.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown fusion strategy {strategy!r}: expected one of {', '.join(STRATEGIES)}")
    if not isinstance(fusion_token, int) or fusion_token < 0:
        raise ValueError(f"fusion_token must be a non-negative integer (tokens fused per layer), got {fusion_token!r}")
    strategy = _ALIASES.get(strategy, strategy)
    if strategy in ("lower", "upper"):
        lo, hi = (1, depth - 1) if strategy == "lower" else (0, depth - 2)
        if not isinstance(fusion_layer, int) or not lo <= fusion_layer <= hi:
            side = "below" if strategy == "lower" else "above"
            raise ValueError(f"fusion_layer={fusion_layer!r} with strategy {strategy!r} (fuse layers {side} it) "
                             f"must be an integer in {lo}..{hi} for a model of depth {depth}")
    fused = {
        "no": lambda i: False,
        "all": lambda i: True,
        "interleaved": lambda i: i % 2 == 1,
        "lower": lambda i: i < fusion_layer,
        "upper": lambda i: i > fusion_layer,
    }[strategy]
    return [fusion_token if fused(i) else 0 for i in range(depth)]


def cap_schedule(requested, num_tokens, num_protected=1):
    """Tokens actually removed per layer: r is capped at (t - protected) // 2 for t tokens entering a layer.

    Returns (removed_per_layer, tokens_per_layer) where tokens_per_layer[i] is the count entering layer i's mixer.
    """
    removed, tokens, t = [], [], num_tokens
    for r in requested:
        r = min(r, max(t - num_protected, 0) // 2)
        t -= r
        removed.append(r)
        tokens.append(t)
    return removed, tokens


# ----------------------------------------------------------------------------- matching

@torch.no_grad()
def bipartite_soft_matching(metric, r, cls_index=None):
    """ToMe's bipartite soft matching on a (B, T, C) metric.

    Returns (src, dst, kept_a): src (B, r) positions of the A tokens fused away, dst (B, r) positions of the
    B tokens they fuse into, kept_a (B, nA - r) positions of the unfused A tokens in ascending order.
    The class token (position cls_index: int, (B,) tensor or None) is never matched: its similarity row
    (if it is an A token) or column (if a B token) is -inf.
    """
    metric = torch.nn.functional.normalize(metric.float(), dim=-1)
    scores = metric[:, ::2] @ metric[:, 1::2].transpose(1, 2)  # (B, nA, nB)
    if isinstance(cls_index, int):  # the same position in every sample: one row or column
        if cls_index % 2:
            scores[:, :, cls_index // 2] = float("-inf")
        else:
            scores[:, cls_index // 2] = float("-inf")
    elif cls_index is not None:  # (B,) positions
        protected = torch.arange(metric.shape[1], device=metric.device) == cls_index[:, None]
        scores.masked_fill_(protected[:, ::2, None] | protected[:, None, 1::2], float("-inf"))
    best, partner = scores.max(dim=-1)  # (B, nA)
    order = best.argsort(dim=-1, descending=True, stable=True)  # ties: the earlier token first
    src_a = order[:, :r]
    kept_a = order[:, r:].sort(dim=-1).values
    return 2 * src_a, 2 * partner.gather(1, src_a) + 1, 2 * kept_a


# ----------------------------------------------------------------------------- merging

@torch.no_grad()
def fusion_indices(src, dst, kept_a, num_tokens, order="released", cls_index=None):
    """Where every token goes, for both output orders.

    Returns (keep, dst_out, dest, cls_out): keep (B, T - r) source positions of the output tokens, dst_out (B, r)
    output index of each src token's destination, dest (B, T) output index of every input token, and cls_out
    the class token's output index (int when static).
    """
    batch, r = src.shape
    device = src.device
    if order == "released":
        odd = torch.arange(1, num_tokens, 2, device=device).expand(batch, -1)
        keep = torch.cat([kept_a, odd], dim=1)
        dst_out = kept_a.shape[1] + (dst - 1) // 2
    elif order == "spatial":
        merged = torch.zeros(batch, num_tokens, dtype=torch.long, device=device).scatter_(1, src, 1)
        positions = torch.arange(num_tokens, device=device)
        keep = (positions + num_tokens * merged).argsort(dim=1)[:, :num_tokens - r]
        dst_out = dst - merged.cumsum(dim=1).gather(1, dst)  # minus the merged tokens at or before it
    else:
        raise ValueError(f"fusion order must be one of {ORDERS}, got {order!r}")
    dest = torch.empty(batch, num_tokens, dtype=torch.long, device=device)
    dest.scatter_(1, keep, torch.arange(keep.shape[1], device=device).expand(batch, -1))
    dest.scatter_(1, src, dst_out)
    # No class token, or one at position 0 (the first A token, never fused): its index stays as it is.
    if cls_index is None or (isinstance(cls_index, int) and cls_index == 0):
        return keep, dst_out, dest, cls_index
    cls = torch.as_tensor(cls_index, device=device).expand(batch)
    return keep, dst_out, dest, dest.gather(1, cls[:, None]).squeeze(1)


def _use_kernels(x):
    """Whether fusion of this stream runs on kernels/fusion.py (float32/16 streams on CUDA with Triton installed)."""
    return fusion_kernels is not None and x.is_cuda and x.dtype != torch.float64


def _flat_rows(index, n):
    """(B, K) positions in sequences of n rows -> (B*K,) rows of the (B*n, C) flattened stream."""
    return (index + torch.arange(0, index.shape[0] * n, n, device=index.device)[:, None]).flatten()


class _MergeRows(torch.autograd.Function):
    """The merge as a linear map M, applied to several (B, T, C) streams at once:
    out[b, j] = (x[b, keep[b, j]] + sum of x[b, src[b, k]] over dst[b, k] = j) / weight[b, j] (weight (B, T - r, 1)).
    Backward: M^T is a gather, dx[b, i] = dout[b, dest[b, i]] / weight[b, dest[b, i]] with dest[b, i] the output row
    of input row i, so no zero-filled scatter buffer is needed and no stream is saved. On CUDA each direction is
    one Triton kernel for two streams; elsewhere index_select / index_add_ on the flattened rows. ``counts``: weight
    is the group size (the plain mean), which the merge kernel uses to skip the rows nothing is fused into.
    """

    @staticmethod
    def forward(ctx, keep, src, dst, dest, weight, counts, *streams):
        ctx.save_for_backward(dest, weight)
        if _use_kernels(streams[0]):
            return tuple(fusion_kernels.merge_rows(streams, keep, src, dst, weight, counts))
        batch, num_tokens = dest.shape
        kept = keep.shape[1]
        keep, src, dst = _flat_rows(keep, num_tokens), _flat_rows(src, num_tokens), _flat_rows(dst, kept)
        outs = []
        for x in streams:
            x = x.reshape(batch * num_tokens, -1)
            out = x.index_select(0, keep)
            out.index_add_(0, dst, x.index_select(0, src))
            outs.append(out.div_(weight.view(-1, 1)).view(batch, kept, -1))
        return tuple(outs)

    @staticmethod
    def backward(ctx, *grads):
        dest, weight = ctx.saved_tensors
        if _use_kernels(grads[0]):
            return (None,) * 6 + tuple(fusion_kernels.gather_rows(grads, dest, weight))
        batch, num_tokens = dest.shape
        rows = _flat_rows(dest, weight.shape[1])
        return (None,) * 6 + tuple((g / weight.to(g.dtype)).reshape(-1, g.shape[-1]).index_select(0, rows)
                                   .view(batch, num_tokens, -1) for g in grads)


def merge(streams, src, keep, dst_out, dest, size=None):
    """Fuse tokens of each stream (B, T, C_k) -> (B, T - r, C_k) with one map: out[j] = mean of x[keep[j]] and
    the src tokens whose destination is j; with ``size`` (B, T, 1) the mean is weighted by it (ToMe).
    dest (B, T) is the output index of every input token (fusion_indices). Differentiable in the streams.
    Returns (list of fused streams, weight (B, T - r, 1)).
    """
    with torch.no_grad():
        weight = merged_size(keep, src, dst_out, size)
    if size is not None:
        streams = [x * size for x in streams]
    return list(_MergeRows.apply(keep, src, dst_out, dest, weight, size is None, *streams)), weight


def merged_size(keep, src, dst_out, size=None):
    """(B, T - r, 1): the number of tokens (or total size) fused into each output token."""
    if size is None:
        weight = torch.ones(keep.shape + (1,), device=keep.device)
        return weight.scatter_add_(1, dst_out[..., None], torch.ones(src.shape + (1,), device=src.device))
    return size.gather(1, keep[..., None]).scatter_add_(1, dst_out[..., None], size.gather(1, src[..., None]))


def fuse(hidden, residual, r, cls_index=0, size=None, order="released", mode="mean", source=None):
    """One Famba-V fusion step on both streams.

    hidden: (B, T, C) normalised hidden states (also the similarity metric); residual: (B, T, C) residual
    stream; r: tokens to remove, capped at (T - 1) // 2 (T // 2 without a class token); cls_index: class-token
    position (int, (B,) tensor or None);
    size: (B, T, 1) token sizes for mode="size" (None = all ones); source: None (not tracked) or the (B, T_in)
    source map of the tokens entering this step (identity_source for the first).
    Returns (hidden, residual, cls_index, size, source), each stream (B, T - r, C); size is None for mode="mean",
    source is None when not tracked, else the (B, T_in) map composed with this step's (compose_source).
    """
    if mode not in MODES:
        raise ValueError(f"fusion mode must be one of {MODES}, got {mode!r}")
    num_tokens = hidden.shape[1]
    r = min(r, (num_tokens - (cls_index is not None)) // 2)  # beyond it, matching would have to take the class token
    if r and num_tokens == 3 and cls_index is not None and not (isinstance(cls_index, int) and cls_index != 1):
        raise ValueError("cannot fuse a 3-token sequence whose class token may sit at position 1: set B would "
                         "hold only the class token")
    if (r and mode == "mean" and order == "released" and _use_kernels(hidden)  # the paper's setting: one kernel
            and num_tokens <= fusion_kernels.FUSION_MAP_MAX_TOKENS):
        src, keep, dst_out, dest, weight, cls_out = fusion_kernels.fusion_map(hidden, r, cls_index)
        return (*_MergeRows.apply(keep, src, dst_out, dest, weight, True, hidden, residual), cls_out, None,
                compose_source(source, dest))
    src, dst, kept_a = bipartite_soft_matching(hidden, r, cls_index)
    keep, dst_out, dest, cls_out = fusion_indices(src, dst, kept_a, num_tokens, order, cls_index)
    if mode == "size" and size is None:
        size = torch.ones(hidden.shape[:2] + (1,), device=hidden.device, dtype=torch.float32)
    (hidden, residual), new_size = merge((hidden, residual), src, keep, dst_out, dest,
                                         size if mode == "size" else None)
    return hidden, residual, cls_out, (new_size if mode == "size" else None), compose_source(source, dest)


# ----------------------------------------------------------------------------- source tracking

def identity_source(batch, num_tokens, device=None):
    """(B, T) source map of an unfused sequence: token t holds input token t (the class token included)."""
    return torch.arange(num_tokens, device=device).expand(batch, -1)


def compose_source(source, dest):
    """source (B, T_in): index of the token holding each input token before a fusion step; dest (B, T): output
    index of each of that step's T input tokens. Returns (B, T_in), the holder after the step (None stays None:
    tracking off costs one Python test)."""
    return None if source is None else dest.gather(1, source)


def source_matrix(source, num_tokens):
    """(B, T_in) source map -> (B, num_tokens, T_in) 0/1 float map: [b, j, t] = 1 iff token j holds input t."""
    return torch.nn.functional.one_hot(source, num_tokens).transpose(1, 2).float()
