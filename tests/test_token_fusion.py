"""Famba-V token fusion (token_fusion.py) against hand-worked examples and an independent naive loop.

Matching (ToMe bipartite soft matching, spec section 2): A = even positions, B = odd positions; every A token
picks its most cosine-similar B token; the r A tokens with the highest best-similarity are fused into their
partners; the class token is never fused. Fused value = plain mean (or size-weighted mean in mode "size").
Output order "released" = [unfused A in original order, then all B in original order]; "spatial" = surviving
tokens in original relative order. The schedule (spec section 3) is checked against the paper's numbers.

The hand-worked examples below were computed on paper; the cosines are written next to each token.
"""
import math

import pytest
import torch

import token_fusion

F64 = torch.float64


pytestmark = pytest.mark.usefixtures("one_thread")


def t64(rows):
    return torch.tensor(rows, dtype=F64)


# ----------------------------------------------------------------------------- hand-worked example 1
# T = 7, C = 2, class token at 0.  B tokens: x1, x3, x5.  A tokens: x0 (class, protected), x2, x4, x6.
#   x2 = (2, 1):   cos(x1) = 2/sqrt5 = 0.894 (best), cos(x3) = 0.447, cos(x5) = -0.894
#   x4 = (1, 3):   cos(x1) = 0.316, cos(x3) = 3/sqrt10 = 0.949 (best), cos(x5) = -0.316
#   x6 = (-4, -1): cos(x1) = -0.970, cos(x3) = -0.243, cos(x5) = 4/sqrt17 = 0.970 (best)
#   ranking of best scores: x6 (0.970) > x4 (0.949) > x2 (0.894); x0 would match x3 (cos 1) if unprotected.
EX1 = [[0., 5.], [4., 0.], [2., 1.], [0., 2.], [1., 3.], [-3., 0.], [-4., -1.]]
# r -> order -> (expected rows, groups of source positions averaged into each output row, class index)
EX1_EXPECTED = {
    1: {"released": ([[0., 5.], [2., 1.], [1., 3.], [4., 0.], [0., 2.], [-3.5, -0.5]],
                     [[0], [2], [4], [1], [3], [5, 6]], 0),
        "spatial": ([[0., 5.], [4., 0.], [2., 1.], [0., 2.], [1., 3.], [-3.5, -0.5]],
                    [[0], [1], [2], [3], [4], [5, 6]], 0)},
    2: {"released": ([[0., 5.], [2., 1.], [4., 0.], [0.5, 2.5], [-3.5, -0.5]],
                     [[0], [2], [1], [3, 4], [5, 6]], 0),
        "spatial": ([[0., 5.], [4., 0.], [2., 1.], [0.5, 2.5], [-3.5, -0.5]],
                    [[0], [1], [2], [3, 4], [5, 6]], 0)},
    3: {"released": ([[0., 5.], [3., 0.5], [0.5, 2.5], [-3.5, -0.5]],
                     [[0], [1, 2], [3, 4], [5, 6]], 0),
        "spatial": ([[0., 5.], [3., 0.5], [0.5, 2.5], [-3.5, -0.5]],
                    [[0], [1, 2], [3, 4], [5, 6]], 0)},
}

# ----------------------------------------------------------------------------- hand-worked example 2
# T = 9, C = 3, class token in the middle at 4 (an A position; M//2 for M = 8 patches).
# B tokens: x1 = (2,0,0), x3 = (0,3,0), x5 = (0,0,1), x7 = (-1,0,0).
#   x0 = (4,1,0):  best x1, cos 4/sqrt17 = 0.970
#   x2 = (3,0,1):  best x1, cos 3/sqrt10 = 0.949
#   x4 = (0,0,7):  class token: would match x5 with cos 1.0 (the top score) if it were not protected
#   x6 = (0,1,2):  best x5, cos 2/sqrt5 = 0.894 (x3: 0.447)
#   x8 = (-5,0,2): best x7, cos 5/sqrt29 = 0.928 (x5: 0.371)
#   ranking: x0 > x2 > x8 > x6; x0 and x2 both fuse into x1 (a mean of three tokens).
EX2 = [[4., 1., 0.], [2., 0., 0.], [3., 0., 1.], [0., 3., 0.], [0., 0., 7.],
       [0., 0., 1.], [0., 1., 2.], [-1., 0., 0.], [-5., 0., 2.]]
EX2_EXPECTED = {
    1: {"released": ([[3., 0., 1.], [0., 0., 7.], [0., 1., 2.], [-5., 0., 2.], [3., 0.5, 0.], [0., 3., 0.],
                      [0., 0., 1.], [-1., 0., 0.]],
                     [[2], [4], [6], [8], [1, 0], [3], [5], [7]], 1),
        "spatial": ([[3., 0.5, 0.], [3., 0., 1.], [0., 3., 0.], [0., 0., 7.], [0., 0., 1.], [0., 1., 2.],
                     [-1., 0., 0.], [-5., 0., 2.]],
                    [[1, 0], [2], [3], [4], [5], [6], [7], [8]], 3)},
    2: {"released": ([[0., 0., 7.], [0., 1., 2.], [-5., 0., 2.], [3., 1 / 3, 1 / 3], [0., 3., 0.], [0., 0., 1.],
                      [-1., 0., 0.]],
                     [[4], [6], [8], [1, 0, 2], [3], [5], [7]], 0),
        "spatial": ([[3., 1 / 3, 1 / 3], [0., 3., 0.], [0., 0., 7.], [0., 0., 1.], [0., 1., 2.], [-1., 0., 0.],
                     [-5., 0., 2.]],
                    [[1, 0, 2], [3], [4], [5], [6], [7], [8]], 2)},
    3: {"released": ([[0., 0., 7.], [0., 1., 2.], [3., 1 / 3, 1 / 3], [0., 3., 0.], [0., 0., 1.], [-3., 0., 1.]],
                     [[4], [6], [1, 0, 2], [3], [5], [7, 8]], 0),
        "spatial": ([[3., 1 / 3, 1 / 3], [0., 3., 0.], [0., 0., 7.], [0., 0., 1.], [0., 1., 2.], [-3., 0., 1.]],
                    [[1, 0, 2], [3], [4], [5], [6], [7, 8]], 2)},
    4: {"released": ([[0., 0., 7.], [3., 1 / 3, 1 / 3], [0., 3., 0.], [0., 0.5, 1.5], [-3., 0., 1.]],
                     [[4], [1, 0, 2], [3], [5, 6], [7, 8]], 0),
        "spatial": ([[3., 1 / 3, 1 / 3], [0., 3., 0.], [0., 0., 7.], [0., 0.5, 1.5], [-3., 0., 1.]],
                    [[1, 0, 2], [3], [4], [5, 6], [7, 8]], 2)},
}

# ----------------------------------------------------------------------------- hand-worked example 3
# T = 9, C = 3, class token at 5 (an odd, B position: its column is masked).
#   x0 = (4,1,0): best x1 0.970;  x2 = (3,0,1): best x1 0.949;  x8 = (-5,0,2): best x7 0.928
#   x4 = (2,4,4): x1 1/3, x3 2/3 (best among unmasked), x5 (class) would be 2/3 too, x7 -1/3
#   x6 = (0,1,2): x3 0.447 (best among unmasked), x5 (class) would be 0.894 and rank 4th
#   ranking: x0 > x2 > x8 > x4 (0.667) > x6 (0.447).
EX3 = [[4., 1., 0.], [2., 0., 0.], [3., 0., 1.], [0., 3., 0.], [2., 4., 4.],
       [0., 0., 1.], [0., 1., 2.], [-1., 0., 0.], [-5., 0., 2.]]
EX3_EXPECTED = {
    2: {"released": ([[2., 4., 4.], [0., 1., 2.], [-5., 0., 2.], [3., 1 / 3, 1 / 3], [0., 3., 0.], [0., 0., 1.],
                      [-1., 0., 0.]],
                     [[4], [6], [8], [1, 0, 2], [3], [5], [7]], 5),
        "spatial": ([[3., 1 / 3, 1 / 3], [0., 3., 0.], [2., 4., 4.], [0., 0., 1.], [0., 1., 2.], [-1., 0., 0.],
                     [-5., 0., 2.]],
                    [[1, 0, 2], [3], [4], [5], [6], [7], [8]], 3)},
    4: {"released": ([[0., 1., 2.], [3., 1 / 3, 1 / 3], [1., 3.5, 2.], [0., 0., 1.], [-3., 0., 1.]],
                     [[6], [1, 0, 2], [3, 4], [5], [7, 8]], 3),
        "spatial": ([[3., 1 / 3, 1 / 3], [1., 3.5, 2.], [0., 0., 1.], [0., 1., 2.], [-3., 0., 1.]],
                    [[1, 0, 2], [3, 4], [5], [6], [7, 8]], 2)},
}

ORDERS = ("released", "spatial")
HAND_CASES = [(name, tokens, cls, r, order, *table[r][order])
              for name, tokens, cls, table in (("ex1", EX1, 0, EX1_EXPECTED), ("ex2", EX2, 4, EX2_EXPECTED),
                                               ("ex3", EX3, 5, EX3_EXPECTED))
              for r in table for order in ORDERS]


def cls_list(cls_out, batch):
    """Class index returned by fuse (int or (B,) tensor) as a list of ints."""
    if isinstance(cls_out, int):
        return [cls_out] * batch
    assert cls_out.shape == (batch,)
    return [int(c) for c in cls_out]


def apply_groups(x, groups, weights=None):
    """out[j] = weighted mean of x[groups[j]] (plain Python sums over rows, float64)."""
    rows = []
    for g in groups:
        w = [1.0] * len(g) if weights is None else [weights[i] for i in g]
        acc = sum(wi * x[i] for wi, i in zip(w, g))
        rows.append(acc / sum(w))
    return torch.stack(rows)


@pytest.mark.parametrize("name,tokens,cls,r,order,expected,groups,cls_expected", HAND_CASES,
                         ids=[f"{c[0]}-r{c[3]}-{c[4]}" for c in HAND_CASES])
def test_fuse_hand_worked(name, tokens, cls, r, order, expected, groups, cls_expected):
    hidden = t64([tokens])
    residual = torch.randn(1, len(tokens), len(tokens[0]), dtype=F64)  # the map must not depend on its values
    h, res, cls_out, size, _ = token_fusion.fuse(hidden, residual, r, cls, order=order)
    assert h.dtype == F64 and size is None
    assert h.shape == (1, len(tokens) - r, hidden.shape[-1])
    assert torch.allclose(h[0], t64(expected), rtol=0, atol=1e-12)
    # the residual stream gets the same map
    assert torch.allclose(res[0], apply_groups(residual[0], groups), rtol=0, atol=1e-12)
    assert cls_list(cls_out, 1) == [cls_expected]
    # and the class row is untouched (never fused)
    assert torch.equal(h[0, cls_expected], hidden[0, cls])


def test_fuse_head_class_token_is_python_int_zero():
    hidden = t64([EX1] * 2)
    for order in ("released", "spatial"):
        _, _, cls_out, _, _ = token_fusion.fuse(hidden, hidden.clone(), 2, 0, order=order)
        assert cls_out == 0 and isinstance(cls_out, int)


def test_fuse_class_token_protection_changes_the_match():
    """Without protection (cls_index=None) example 2's x4 = (0,0,7) is the best match (cos 1 with x5) and is
    fused first; with cls_index=4 it survives and x0 is fused instead."""
    hidden = t64([EX2])
    h, _, cls_out, _, _ = token_fusion.fuse(hidden, hidden.clone(), 1, None, order="spatial")
    assert cls_out is None
    want = t64([[4., 1., 0.], [2., 0., 0.], [3., 0., 1.], [0., 3., 0.], [0., 0., 4.],
                [0., 1., 2.], [-1., 0., 0.], [-5., 0., 2.]])
    assert torch.allclose(h[0], want, atol=1e-12)


def test_cap_schedule_hand_worked():
    # t = 9: min(10, 8 // 2) = 4 -> 5 tokens; min(10, 4 // 2) = 2 -> 3; min(10, 1) = 1 -> 2; min(10, 0) = 0.
    assert token_fusion.cap_schedule([10, 10, 10, 10], 9) == ([4, 2, 1, 0], [5, 3, 2, 2])
    # t = 12: min(3, 5) = 3 -> 9; 0 -> 9; min(3, 4) = 3 -> 6; min(3, 5 // 2) = 2 -> 4.
    assert token_fusion.cap_schedule([3, 0, 3, 3], 12) == ([3, 0, 3, 2], [9, 9, 6, 4])
    assert token_fusion.cap_schedule([10], 9, num_protected=0) == ([4], [5])
    # a capped request on the hand example (T = 7 -> at most 3) is exactly the r = 3 case
    removed, _ = token_fusion.cap_schedule([100], 7)
    h, _, _, _, _ = token_fusion.fuse(t64([EX1]), t64([EX1]), removed[0], 0)
    assert removed == [3]
    assert torch.allclose(h[0], t64(EX1_EXPECTED[3]["released"][0]), atol=1e-12)


# ----------------------------------------------------------------------------- size-weighted mode
# T = 5, C = 2, class at 0.  p1 = (1,0), p3 = (0,-2) are B; p2 = (3,1), p4 = (-1,2) are A.
# Step 1 (r=1): p2 -> p1 (cos 0.949; p4's best is p1 at -0.447).  p1m = (2, 0.5), size 2.
#   released: [p0, p4, p1m, p3], sizes [1, 1, 2, 1]
# Step 2 (r=1): A = {p0 (class), p1m}, B = {p4, p3}; p1m: cos(p4) = -1/sqrt(4.25*5) = -0.217,
#   cos(p3) = -1/sqrt(4.25*4) = -0.243 -> p1m fuses into p4.
#   size mode: (2*(2,0.5) + 1*(-1,2)) / 3 = (1, 1) (the true mean of p1, p2, p4), size 3
#   mean mode: ((2,0.5) + (-1,2)) / 2 = (0.5, 1.25)
SIZE_EX = [[0., 1.], [1., 0.], [3., 1.], [0., -2.], [-1., 2.]]


def test_size_mode_accumulates_over_two_fusions():
    hidden = t64([SIZE_EX])
    residual = torch.randn(1, 5, 2, dtype=F64)
    h1, r1, c1, s1, _ = token_fusion.fuse(hidden, residual, 1, 0, mode="size")
    assert torch.allclose(h1[0], t64([[0., 1.], [-1., 2.], [2., 0.5], [0., -2.]]), atol=1e-12)
    assert s1.shape == (1, 4, 1) and s1[0, :, 0].tolist() == [1., 1., 2., 1.]
    h2, r2, c2, s2, _ = token_fusion.fuse(h1, r1, 1, c1, s1, mode="size")
    assert torch.allclose(h2[0], t64([[0., 1.], [1., 1.], [0., -2.]]), atol=1e-12)
    assert s2[0, :, 0].tolist() == [1., 3., 1.]
    assert c2 == 0
    # residual: the same size-weighted map, i.e. plain means of the original tokens here
    assert torch.allclose(r2[0], apply_groups(residual[0], [[0], [1, 2, 4], [3]]), atol=1e-12)

    # mean mode on the same tokens: equal weights at every step, no sizes returned
    m1 = token_fusion.fuse(hidden, residual, 1, 0, mode="mean")
    assert m1[3] is None
    m2 = token_fusion.fuse(m1[0], m1[1], 1, m1[2], m1[3], mode="mean")
    assert torch.allclose(m2[0][0], t64([[0., 1.], [0.5, 1.25], [0., -2.]]), atol=1e-12)


def test_size_mode_uses_given_sizes():
    """Example 1, r = 2, with explicit sizes: x5 (size 3) absorbs x6 (size 1); x3 (size 1) absorbs x4 (size 4)."""
    hidden = t64([EX1])
    size = torch.tensor([[[1.], [2.], [1.], [1.], [4.], [3.], [1.]]])
    h, _, _, s, _ = token_fusion.fuse(hidden, hidden.clone(), 2, 0, size, order="spatial", mode="size")
    # x3m = (1*(0,2) + 4*(1,3)) / 5 = (0.8, 2.8);  x5m = (3*(-3,0) + 1*(-4,-1)) / 4 = (-3.25, -0.25)
    want = t64([[0., 5.], [4., 0.], [2., 1.], [0.8, 2.8], [-3.25, -0.25]])
    assert torch.allclose(h[0], want, atol=1e-12)
    assert s[0, :, 0].tolist() == [1., 2., 1., 5., 4.]


# ----------------------------------------------------------------------------- gradients

@pytest.mark.parametrize("mode", ["mean", "size"])
@pytest.mark.parametrize("order", ["released", "spatial"])
def test_fuse_gradient_is_the_averaging_matrix(order, mode):
    """d(sum(out_h * W1) + sum(out_r * W2)) / d(in) = M^T W with M the hand-known averaging matrix (example 2,
    r = 3), for both streams."""
    tokens, cls, r = EX2, 4, 3
    expected, groups, _ = EX2_EXPECTED[r][order]
    sizes = [1., 2., 1., 3., 1., 1., 2., 1., 5.]
    hidden = t64([tokens]).requires_grad_()
    residual = torch.randn(1, 9, 3, dtype=F64, requires_grad=True)
    size = torch.tensor(sizes).view(1, 9, 1) if mode == "size" else None
    h, res, _, _, _ = token_fusion.fuse(hidden, residual, r, cls, size, order=order, mode=mode)
    w1, w2 = torch.randn_like(h), torch.randn_like(res)
    g_h, g_r = torch.autograd.grad((h * w1).sum() + (res * w2).sum(), (hidden, residual))
    merge = torch.zeros(len(groups), 9, dtype=F64)
    for j, g in enumerate(groups):
        total = sum(sizes[i] if mode == "size" else 1.0 for i in g)
        for i in g:
            merge[j, i] = (sizes[i] if mode == "size" else 1.0) / total
    assert torch.allclose(g_h[0], merge.t() @ w1[0], atol=1e-12)
    assert torch.allclose(g_r[0], merge.t() @ w2[0], atol=1e-12)

@pytest.mark.parametrize("mode", ["mean", "size"])
def test_fuse_keeps_no_stream_for_backward(mode):
    """The merge's backward needs only the fusion map: nothing of the (B, T, C) streams is saved for it (a
    gather/scatter merge would keep its input alive until the backward pass)."""
    hidden = torch.randn(2, 9, 4, dtype=F64, requires_grad=True)
    residual = torch.randn(2, 9, 4, dtype=F64, requires_grad=True)
    size = torch.rand(2, 9, 1, dtype=F64) + 1 if mode == "size" else None
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        h, res, _, _, _ = token_fusion.fuse(hidden, residual, 3, 0, size, mode=mode)
    assert saved and all(t.dtype == torch.long or t.shape[-1] == 1 for t in saved), [t.shape for t in saved]
    assert h.shape == res.shape == (2, 6, 4)


# ----------------------------------------------------------------------------- naive reimplementation

def naive_fuse(hidden, residual, r, cls_index, size, order, mode):
    """Python loops over batch and tokens, float64: matching, merging, ordering, class index, sizes."""
    batch, tokens, _ = hidden.shape
    out_h, out_r, out_cls, out_s = [], [], [], []
    for b in range(batch):
        if cls_index is None:
            cls = None
        elif isinstance(cls_index, int):
            cls = cls_index
        else:
            cls = int(cls_index[b])
        rows = hidden[b].double()
        norms = [math.sqrt(sum(v * v for v in row.tolist())) for row in rows]
        unit = [[v / n for v in row.tolist()] for row, n in zip(rows, norms)]
        best = {}
        for a in range(0, tokens, 2):
            if a == cls:
                best[a] = (-math.inf, None)
                continue
            top, partner = -math.inf, None
            for p in range(1, tokens, 2):
                if p == cls:
                    continue
                s = sum(u * v for u, v in zip(unit[a], unit[p]))
                if s > top:
                    top, partner = s, p
            best[a] = (top, partner)
        ranked = sorted(best, key=lambda a: -best[a][0])
        fused_a = ranked[:r]
        absorbed = {p: [] for p in range(1, tokens, 2)}
        for a in fused_a:
            absorbed[best[a][1]].append(a)
        kept_a = sorted(a for a in range(0, tokens, 2) if a not in fused_a)
        b_tokens = list(range(1, tokens, 2))
        survivors = kept_a + b_tokens if order == "released" else sorted(kept_a + b_tokens)
        hs, rs, ss = [], [], []
        for t in survivors:
            members = [t] + absorbed.get(t, [])
            w = [float(size[b, m, 0]) if (mode == "size" and size is not None) else 1.0 for m in members]
            hs.append(sum(wi * hidden[b, m].double() for wi, m in zip(w, members)) / sum(w))
            rs.append(sum(wi * residual[b, m].double() for wi, m in zip(w, members)) / sum(w))
            ss.append(sum(w))
        out_h.append(torch.stack(hs))
        out_r.append(torch.stack(rs))
        out_s.append(ss)
        out_cls.append(None if cls is None else survivors.index(cls))
    return torch.stack(out_h), torch.stack(out_r), out_cls, out_s


NAIVE_CASES = []
for _tokens in (7, 8, 9, 12, 17):
    for _r in sorted({1, 2, (_tokens - 1) // 2}):
        for _cls in ("head", "middle", "per-sample", "none"):
            NAIVE_CASES.append((_tokens, _r, _cls))


@pytest.mark.parametrize("tokens,r,cls_kind", NAIVE_CASES)
def test_fuse_matches_naive_loop(tokens, r, cls_kind):
    gen = torch.Generator().manual_seed(1000 * tokens + 10 * r + len(cls_kind))
    batch = 3
    hidden = torch.randn(batch, tokens, 6, dtype=F64, generator=gen)
    residual = torch.randn(batch, tokens, 6, dtype=F64, generator=gen)
    size = torch.randint(1, 5, (batch, tokens, 1), generator=gen).float()
    cls = {"head": 0, "middle": (tokens - 1) // 2, "none": None,
           "per-sample": torch.tensor([tokens - 1, 1, tokens // 2])}[cls_kind]
    for order in ("released", "spatial"):
        for mode, sz in (("mean", None), ("size", None), ("size", size)):
            h, res, cls_out, s, _ = token_fusion.fuse(hidden, residual, r, cls, sz, order=order, mode=mode)
            nh, nr, ncls, ns = naive_fuse(hidden, residual, r, cls, sz, order, mode)
            case = f"{order} {mode} sizes={sz is not None}"
            assert h.shape == (batch, tokens - r, 6), case
            assert torch.allclose(h, nh, rtol=1e-12, atol=1e-12), case
            assert torch.allclose(res, nr, rtol=1e-12, atol=1e-12), case
            if cls is None:
                assert cls_out is None
            else:
                assert cls_list(cls_out, batch) == ncls, case
                for b in range(batch):  # the class row is carried through unchanged (x * s / s in size mode)
                    c0 = cls if isinstance(cls, int) else int(cls[b])
                    assert torch.allclose(h[b, ncls[b]], hidden[b, c0], rtol=1e-15, atol=0), case
            if mode == "size":
                assert s[..., 0].tolist() == ns, case
            else:
                assert s is None


@pytest.mark.parametrize("cls", [0, 3, None])
def test_fuse_caps_r_as_the_schedule_does(cls):
    """r above (T - 1) // 2 (T // 2 without a class token) removes only that many, as the naive loop at the cap:
    the matching never reaches the class token's -inf row (uncapped, T = 7 and r = 4 fused it)."""
    gen = torch.Generator().manual_seed(7)
    hidden, residual = torch.randn(2, 7, 5, dtype=F64, generator=gen), torch.randn(2, 7, 5, dtype=F64, generator=gen)
    cap = 3
    for order in ("released", "spatial"):
        h, res, cls_out, _, source = token_fusion.fuse(hidden, residual, cap + 1 + (cls is None), cls, order=order,
                                                       source=token_fusion.identity_source(2, 7))
        nh, nr, ncls, _ = naive_fuse(hidden, residual, cap, cls, None, order, "mean")
        assert h.shape == (2, 7 - cap, 5)
        assert torch.allclose(h, nh, rtol=1e-12, atol=1e-12) and torch.allclose(res, nr, rtol=1e-12, atol=1e-12)
        if cls is not None:
            assert cls_list(cls_out, 2) == ncls
            for b in range(2):  # the class token's output token holds the class token alone
                assert (source[b] == ncls[b]).nonzero().flatten().tolist() == [cls]


def test_fuse_refuses_when_class_token_would_be_alone_in_set_b():
    """T = 3 with the class token at 1: B = {class token}, so no A token has a partner; fusing would average an A
    token into the class token. fuse() refuses, and so does a model whose schedule reaches that case
    (3 tokens, middle class token at index 1 after layer 0)."""
    import models_mamba
    hidden = t64([[[1., 0.], [0., 1.], [1., 1.]]])
    with pytest.raises(ValueError, match="only the class token"):
        token_fusion.fuse(hidden, hidden.clone(), 1, 1)
    with pytest.raises(ValueError, match="only the class token"):
        token_fusion.fuse(hidden, hidden.clone(), 1, torch.tensor([0]))
    h, _, cls_out, _, _ = token_fusion.fuse(hidden, hidden.clone(), 1, 0)  # class token in A: fine
    assert cls_out == 0 and torch.equal(h[0, 0], hidden[0, 0])
    with pytest.raises(ValueError, match="3-token sequence"):
        models_mamba.VisionMamba(img_size=32, patch_size=16, depth=2, cls_position="middle",
                                 fusion_strategy="all", fusion_token=2, fusion_order="spatial")


# ----------------------------------------------------------------------------- source tracking
# Two fused layers (r = 2 each, 9 -> 7 -> 5 tokens). Layer 1's metric is the tokens below; layer 2's is written per
# output slot of layer 1 (as a mixer would produce it), one table per order. Rows are integer or one-hot, so every
# cosine is exact and no best scores tie; the class token's own best match ranks second, so it would be fused if it
# were not protected. Groups list the input positions each output token holds, in output order.
#
# Class token at the head (0): x0 = (4,0,0,1) (cos 0.970 with x1), (4,0,1) in layer 2. Layer 1: B = x1 = e1,
# x3 = e2, x5 = e3, x7 = e4. A best matches: x2 = (3,1,0,0) -> x1 (0.949), x4 = (0,0,2,1) -> x5 (0.894), x6 = e4
# -> x7 (1.0), x8 = (0,2,0,3) -> x7 (0.832). x6 and x2 fuse:
#   released [0], [4], [8], [1,2], [3], [5], [6,7];  spatial [0], [1,2], [3], [4], [5], [6,7], [8].
# Layer 2, released (A = slots 0,2,4,6; B = 1,3,5): slot 2 = e3 -> slot 5 (1.0), slot 6 = (0,3,1) -> slot 1 (0.949),
#   slot 4 = (1,0,2) -> slot 5 (0.894): slots 2 and 6 fuse -> [0], [3], [4,6,7], [1,2], [5,8].
# Layer 2, spatial: slot 2 = e3 -> slot 5 (1.0), slot 4 = (0,3,1) -> slot 3 (0.949), slot 6 = (1,0,2) -> slot 5
#   (0.894): slots 2 and 4 fuse -> [0], [1,2], [4,5], [3,6,7], [8].
E4 = [[1., 0., 0., 0.], [0., 1., 0., 0.], [0., 0., 1., 0.], [0., 0., 0., 1.]]
HEAD_L1 = [[4., 0., 0., 1.], E4[0], [3., 1., 0., 0.], E4[1], [0., 0., 2., 1.], E4[2], E4[3], E4[3], [0., 2., 0., 3.]]
# Class token in the middle (4 = M//2 of 8 patches), x4 = (0,0,4,1) (cos 0.970 with x5). Layer 1: x0 = (3,1,0,0)
# -> x1 (0.949), x2 = (1,0,0,2) -> x7 (0.894), x6 = e4 -> x7 (1.0), x8 = (0,2,0,3) -> x7 (0.832). x6 and x0 fuse:
#   released [2], [4], [8], [0,1], [3], [5], [6,7] (class token at 1, a B slot);
#   spatial [0,1], [2], [3], [4], [5], [6,7], [8] (class token at 3, a B slot).
# Layer 2, released (the class slot 1 = e1 is masked as a partner; slot 0 = (5,1,0) has cos 0.981 with it):
#   slot 0 -> slot 3 (0.196), slot 2 = e3 -> slot 5 (1.0), slot 4 = (0,3,1) -> slot 3 (0.949), slot 6 = (0,1,2)
#   -> slot 5 (0.894): slots 2 and 4 fuse -> [2], [6,7], [4], [0,1,3], [5,8].
# Layer 2, spatial (the class slot 3 = e2 is masked; slot 0 = (1,5,0) has cos 0.981 with it): slot 0 -> slot 1
#   (0.196), slot 2 = e3 -> slot 5 (1.0), slot 4 = (3,0,1) -> slot 1 (0.949), slot 6 = (1,0,2) -> slot 5 (0.894):
#   slots 2 and 4 fuse -> [0,1], [2,5], [4], [3,6,7], [8].
MID_L1 = [[3., 1., 0., 0.], E4[0], [1., 0., 0., 2.], E4[1], [0., 0., 4., 1.], E4[2], E4[3], E4[3], [0., 2., 0., 3.]]
E3 = [[1., 0., 0.], [0., 1., 0.], [0., 0., 1.]]
TRACE_CASES = {  # name -> (class position, layer-1 metric, {order: (layer-2 metric, groups after 1, after 2, cls)})
    "head": (0, HEAD_L1, {
        "released": ([[4., 0., 1.], E3[1], E3[2], E3[0], [1., 0., 2.], E3[2], [0., 3., 1.]],
                     [[0], [4], [8], [1, 2], [3], [5], [6, 7]], [[0], [3], [4, 6, 7], [1, 2], [5, 8]], (0, 0)),
        "spatial": ([[4., 0., 1.], E3[0], E3[2], E3[1], [0., 3., 1.], E3[2], [1., 0., 2.]],
                    [[0], [1, 2], [3], [4], [5], [6, 7], [8]], [[0], [1, 2], [4, 5], [3, 6, 7], [8]], (0, 0))}),
    "middle": (4, MID_L1, {
        "released": ([[5., 1., 0.], E3[0], E3[2], E3[1], [0., 3., 1.], E3[2], [0., 1., 2.]],
                     [[2], [4], [8], [0, 1], [3], [5], [6, 7]], [[2], [6, 7], [4], [0, 1, 3], [5, 8]], (1, 2)),
        "spatial": ([[1., 5., 0.], E3[0], E3[2], E3[1], [3., 0., 1.], E3[2], [1., 0., 2.]],
                    [[0, 1], [2], [3], [4], [5], [6, 7], [8]], [[0, 1], [2, 5], [4], [3, 6, 7], [8]], (3, 2))}),
}


def held(source, num_tokens):
    """(T_in,) source map -> for each of num_tokens output tokens, the input positions it holds (plain loop)."""
    groups = [[] for _ in range(num_tokens)]
    for t, j in enumerate(source.tolist()):
        groups[j].append(t)
    return groups


@pytest.mark.parametrize("mode", ["mean", "size"])
@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("case", ["head", "middle", "batched"])
def test_source_map_after_two_fused_layers_hand_worked(case, order, mode):
    """The composed source map names exactly the hand-worked groups after each of two fused layers; every input
    token is held by one output token, the class token only by itself. In size mode the residual after both
    steps is then the plain mean of each group's input rows, and the sizes are the group sizes."""
    names = ["head", "middle"] if case == "batched" else [case]
    cls = [TRACE_CASES[n][0] for n in names]
    layer1 = t64([TRACE_CASES[n][1] for n in names])
    layer2 = t64([TRACE_CASES[n][2][order][0] for n in names])
    cls_index = cls[0] if case != "batched" else torch.tensor(cls)  # per-sample positions take the tensor path
    residual = torch.randn(len(names), 9, 5, dtype=F64)
    source = token_fusion.identity_source(len(names), 9)
    assert source.tolist() == [list(range(9))] * len(names)
    _, res1, cls1, size1, source1 = token_fusion.fuse(layer1, residual, 2, cls_index, order=order, mode=mode,
                                                      source=source)
    _, res2, cls2, size2, source2 = token_fusion.fuse(layer2, res1, 2, cls1, size1, order=order, mode=mode,
                                                      source=source1)
    for b, name in enumerate(names):
        _, _, table = TRACE_CASES[name]
        _, groups1, groups2, (c1, c2) = table[order]
        assert held(source1[b], 7) == groups1
        assert held(source2[b], 5) == groups2
        assert cls_list(cls1, len(names))[b] == c1 and cls_list(cls2, len(names))[b] == c2
        assert groups2[c2] == [cls[b]]  # the class token, tracked as itself
        if mode == "size":
            assert size2[b, :, 0].tolist() == [len(g) for g in groups2]
            assert torch.allclose(res2[b], apply_groups(residual[b], groups2), rtol=0, atol=1e-12)
    matrix = token_fusion.source_matrix(source2, 5)
    assert matrix.shape == (len(names), 5, 9)
    assert torch.equal(matrix.sum(1), torch.ones(len(names), 9))  # no input token lost or held twice
    assert (matrix.sum(2) >= 1).all()


def test_source_map_is_not_tracked_unless_asked():
    hidden = t64([HEAD_L1])
    assert token_fusion.fuse(hidden, hidden.clone(), 2, 0)[4] is None
    assert token_fusion.compose_source(None, torch.zeros(1, 9, dtype=torch.long)) is None


@pytest.mark.parametrize("name", ["head", "middle"])
def test_source_map_hand_cases_need_the_class_token_protection(name):
    """Unprotected, the class token of each layer-1 example would be fused (its best score ranks second)."""
    cls, layer1, _ = TRACE_CASES[name]
    hidden = t64([layer1])
    *_, source = token_fusion.fuse(hidden, hidden.clone(), 2, None, source=token_fusion.identity_source(1, 9))
    partner = {"head": 1, "middle": 5}[name]
    assert int(source[0, cls]) == int(source[0, partner])


# ----------------------------------------------------------------------------- validation

def test_fuse_rejects_bad_order_and_mode():
    x = t64([EX1])
    with pytest.raises(ValueError, match="released.*spatial"):
        token_fusion.fuse(x, x.clone(), 1, 0, order="sorted")
    with pytest.raises(ValueError, match="mean.*size"):
        token_fusion.fuse(x, x.clone(), 1, 0, mode="max")


# ----------------------------------------------------------------------------- schedule

def test_fusion_schedule_layers():
    depth = 24
    fused = lambda s, L, r=9: [i for i, v in enumerate(token_fusion.fusion_schedule(s, L, r, depth)) if v]
    assert fused("no", 0) == [] and fused("none", 3) == []
    assert fused("all", 0) == list(range(24))
    assert fused("interleaved", 0) == [1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23]
    assert fused("alternate", 0) == fused("interleaved", 0)
    assert fused("lower", 19) == list(range(19))          # i < L: boundary layer 19 not fused
    assert fused("upper", 4) == list(range(5, 24))        # i > L: boundary layer 4 not fused
    assert fused("lower", 1) == [0] and fused("lower", 23) == list(range(23))
    assert fused("upper", 0) == list(range(1, 24)) and fused("upper", 22) == [23]
    assert token_fusion.fusion_schedule("upper", 4, 8, depth) == [0] * 5 + [8] * 19
    assert token_fusion.fusion_schedule("all", 0, 0, depth) == [0] * 24
    # all / interleaved accept and ignore any fusion_layer
    for layer in (-5, 0, 7, 23, 100, None):
        assert token_fusion.fusion_schedule("all", layer, 7, depth) == [7] * 24
        assert token_fusion.fusion_schedule("interleaved", layer, 14, depth) == [0, 14] * 12
        assert token_fusion.fusion_schedule("no", layer, 14, depth) == [0] * 24


@pytest.mark.parametrize("strategy,layer,token,removed,fraction", [
    ("all", 0, 7, 168, 0.556),
    ("interleaved", 0, 14, 168, 0.574),
    ("lower", 19, 9, 171, 0.457),
    ("upper", 4, 9, 171, 0.638),
    ("upper", 4, 8, 152, 0.679),
])
def test_paper_schedules_vim_ti_224(strategy, layer, token, removed, fraction):
    requested = token_fusion.fusion_schedule(strategy, layer, token, 24)
    per_layer, tokens = token_fusion.cap_schedule(requested, 197)
    assert sum(per_layer) == removed
    assert round(sum(tokens) / (24 * 197), 3) == fraction
    assert per_layer == requested  # no cap reached at 197 tokens


def test_fusion_schedule_rejects_invalid():
    allowed = ("no", "none", "all", "interleaved", "alternate", "lower", "upper")
    with pytest.raises(ValueError) as err:
        token_fusion.fusion_schedule("middle", 0, 9, 24)
    assert all(name in str(err.value) for name in allowed)
    with pytest.raises(ValueError, match="non-negative"):
        token_fusion.fusion_schedule("all", 0, -1, 24)
    for strategy, bad, allowed_range in (("lower", 0, "1..23"), ("lower", 24, "1..23"), ("lower", -1, "1..23"),
                                         ("upper", 23, "0..22"), ("upper", -1, "0..22"), ("upper", 30, "0..22")):
        with pytest.raises(ValueError, match=allowed_range.replace(".", r"\.")):
            token_fusion.fusion_schedule(strategy, bad, 9, 24)
    with pytest.raises(ValueError, match="0..4"):  # depth 6: upper needs a layer above it
        token_fusion.fusion_schedule("upper", 5, 1, 6)
