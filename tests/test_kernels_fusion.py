"""kernels/fusion.py (token fusion's matching, fusion map and merge) against token_fusion's torch functions and
hand-worked cases, with scores built to be exact so that ties break the same way in any order of summation.
Without CUDA the kernels run in Triton's interpreter (tests/conftest.py)."""
import math

import pytest
import torch

import ssm_ops

pytestmark = pytest.mark.skipif(not ssm_ops.TRITON_AVAILABLE, reason="needs Triton")

from kernels import fusion as kt  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _merge_case(dtype, c=5):
    """Two samples of 9 tokens, r = 3, with two fused rows landing on one output row in each sample (sample 0:
    rows 0 and 2 into output row 4, row 6 into 5; sample 1: rows 5 and 7 into 0, row 6 into 5). The weights are
    the group sizes times 1.5, so a kernel that counted the group instead of reading weight would fail."""
    g = torch.Generator().manual_seed(c)
    x = torch.randn(2, 9, c, generator=g).to(dtype)
    keep = torch.tensor([[1, 3, 4, 5, 7, 8], [0, 1, 2, 3, 4, 8]])
    src = torch.tensor([[0, 2, 6], [5, 6, 7]])
    dst = torch.tensor([[4, 4, 5], [0, 5, 0]])   # output rows
    weight = torch.tensor([[1., 1., 1., 1., 3., 2.], [3., 1., 1., 1., 1., 2.]])[..., None] * 1.5
    dest = torch.empty(2, 9, dtype=torch.long)
    for b in range(2):
        dest[b, keep[b]] = torch.arange(6)
        dest[b, src[b]] = dst[b]
    return x, keep, src, dst, weight, dest


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("c", [5, 300])
@pytest.mark.parametrize("n_streams", [1, 2, 3])
@pytest.mark.parametrize("rows,counts", [(1, False), (4, True), (8, True)])
def test_merge_rows_and_its_transpose_against_loops(dtype, c, n_streams, rows, counts, monkeypatch):
    """Each stream merged (and its gradient gathered) as by the loops, whether it shares a launch with another
    stream or runs alone; the second stream float32 as the fusion's residual stream is, beside a bfloat16 one.
    The transpose in programs of 1, 4 and 8 rows: 8-row programs over 18 input rows leave the last partly empty.
    With ``counts`` the weights are the group sizes themselves, from which the merge skips the rows of weight 1."""
    monkeypatch.setattr(kt, "GATHER_ROWS", rows)
    x, keep, src, dst, weight, dest = _merge_case(dtype, c)
    if counts:
        weight = weight / 1.5
    g = torch.Generator().manual_seed(2)
    streams = [x if k % 2 == 0 else torch.randn(2, 9, c, generator=g) for k in range(n_streams)]
    grads = [torch.randn(2, 6, c, generator=g).to(t.dtype) for t in streams]
    on = lambda ts: [t.to(DEVICE) for t in ts]  # noqa: E731
    got = kt.merge_rows(on(streams), *on([keep, src, dst, weight]), counts=counts)
    got_dx = kt.gather_rows(on(grads), *on([dest, weight]))
    assert len(got) == len(got_dx) == n_streams
    for x, grad, merged, dx in zip(streams, grads, got, got_dx):
        want = torch.zeros(2, 6, c, dtype=torch.float64)
        for b in range(2):
            for j in range(6):
                want[b, j] = x[b, keep[b, j]].double()
                for k in range(3):
                    if dst[b, k] == j:
                        want[b, j] += x[b, src[b, k]].double()
                want[b, j] /= weight[b, j, 0].double()
        want_dx = torch.empty(2, 9, c, dtype=torch.float64)
        for b in range(2):
            for i in range(9):  # column i of M: 1 / weight of the output row that input row i lands in
                want_dx[b, i] = grad[b, dest[b, i]].double() / weight[b, dest[b, i], 0].double()
        # float32 sums, one rounding to the stream's dtype (the CPU interpreter truncates bfloat16: one step)
        tol = dict(rtol=1e-6, atol=1e-6) if x.dtype == torch.float32 else dict(rtol=2 ** -7, atol=1e-6)
        assert merged.dtype == x.dtype and torch.allclose(merged.cpu().double(), want.to(x.dtype).double(), **tol)
        assert dx.dtype == x.dtype and torch.allclose(dx.cpu().double(), want_dx.to(x.dtype).double(), **tol)


def exact_metric(batch, tokens, c, seed):
    """(batch, tokens, c) similarity metrics whose cosines are exact in float32 and bfloat16, so that the torch
    matching (a BLAS matmul, blocked and vectorised as the CPU and thread count have it) and fusion_map (numpy in
    Triton's interpreter, or a GPU) get the same scores bit for bit, ties included, whatever their summation order.
    Random rows would not: rounding differs with a row's place in a tile, so equal rows need not score equally,
    and near-equal best scores can swap. Each row is s (1 or 2) on k (1, 4 or 16) of its channels and 0 elsewhere:
    its norm s * sqrt(k) is a power of two, every normalised entry, product and partial sum is a multiple of 1/16
    (exact), and different scores differ by 1/16 at least. Non-negative, so no score is -0.0 (a sort on the bits,
    a radix sort, would put it below 0.0 instead of tying them). Channel counts below 16 drop k = 16.
    The values are coarse on purpose: many A tokens share a best score and many rows have several best partners,
    so both tie rules decide a large part of every matching."""
    g = torch.Generator().manual_seed(seed)
    ks = [k for k in (1, 4, 16) if k <= c]
    x = torch.zeros(batch, tokens, c)
    for row in x.view(-1, c):
        k = ks[int(torch.randint(len(ks), (), generator=g))]
        row[torch.randperm(c, generator=g)[:k]] = float(torch.randint(1, 3, (), generator=g))
    return x


def exact_matching(x, r, cls):
    """Bipartite matching from its definition, for exact_metric's rows (float64 cosines are exact for them):
    every A token (even position) takes the first B token (odd position) of its best score; the r A tokens with
    the highest best score are fused, ties to the earlier token; the class token is never matched.
    Returns src, dst (B, r) lists as token_fusion.bipartite_soft_matching orders them."""
    unit = x.double() / x.double().norm(dim=-1, keepdim=True)
    src, dst = [], []
    for b in range(x.shape[0]):
        c = cls if cls is None or isinstance(cls, int) else int(cls[b])
        best, partner = {}, {}
        for a in range(0, x.shape[1], 2):
            row = [-math.inf if a == c or p == c else float(unit[b, a] @ unit[b, p])
                   for p in range(1, x.shape[1], 2)]
            best[a] = max(row)
            partner[a] = 2 * row.index(best[a]) + 1   # list.index: the first best partner
        order = sorted(best, key=lambda a: (-best[a], a))  # descending score, then ascending position
        src.append(order[:r])
        dst.append([partner[a] for a in order[:r]])
    return torch.tensor(src), torch.tensor(dst)


def test_exact_metric_scores_are_exact_and_tie():
    """The premise of the tests below: torch's float32 matching scores of exact_metric rows equal the float64
    ones bit for bit (with the thread count the suite runs under and with one thread), and they do tie."""
    x = exact_metric(2, 183, 100, seed=0)
    unit64 = x.double() / x.double().norm(dim=-1, keepdim=True)
    want = unit64[:, ::2] @ unit64[:, 1::2].transpose(1, 2)
    assert torch.equal(want * 16, (want * 16).round())   # multiples of 1/16
    threads = torch.get_num_threads()
    try:
        for n in {threads, 1}:
            torch.set_num_threads(n)
            for dtype in (torch.float32, torch.bfloat16):
                unit = torch.nn.functional.normalize(x.to(dtype).float(), dim=-1)
                assert torch.equal((unit[:, ::2] @ unit[:, 1::2].transpose(1, 2)).double(), want)
    finally:
        torch.set_num_threads(threads)
    best = want.max(-1).values
    assert all(len(set(row.tolist())) < len(row) // 4 for row in best)   # many A tokens share a best score
    assert ((want == best[..., None]).sum(-1) > 1).any(-1).all()          # and rows with several best partners


@pytest.mark.parametrize("mode", ["mean", "size"])
def test_fuse_through_the_kernels_equals_the_torch_merge(monkeypatch, mode):
    """token_fusion.fuse with its Triton merge (forced on, interpreted on the CPU) against its torch merge. In mode
    "mean" the kernels also do the matching (fusion_map): the hidden stream, which is the metric, has exact scores
    (exact_metric), so both sides fuse the same tokens on any CPU."""
    import token_fusion
    g = torch.Generator().manual_seed(0)
    hidden, residual = exact_metric(3, 21, 6, seed=0), torch.randn(3, 21, 6, generator=g)
    size = torch.rand(3, 21, 1, generator=g) + 1 if mode == "size" else None
    w1, w2 = torch.randn(3, 14, 6, generator=g), torch.randn(3, 14, 6, generator=g)
    results = []
    for kernels in (False, True):
        monkeypatch.setattr(token_fusion, "_use_kernels", lambda x, on=kernels: on)
        h, r = (t.clone().to(DEVICE).requires_grad_() for t in (hidden, residual))
        out_h, out_r, cls, _, _ = token_fusion.fuse(h, r, 7, 10, None if size is None else size.to(DEVICE), mode=mode)
        grads = torch.autograd.grad((out_h * w1.to(DEVICE)).sum() + (out_r * w2.to(DEVICE)).sum(), (h, r))
        results.append([t.detach().cpu() for t in (out_h, out_r, *grads)])
    for a, b in zip(*results):
        assert torch.allclose(a, b, rtol=1e-6, atol=1e-6)


MAP_CASES = [  # tokens, channels, r, class token
    (7, 6, 3, 0), (8, 6, 3, "per-sample"), (9, 5, 2, 4), (9, 5, 4, 5), (21, 40, 7, None), (21, 40, 10, "per-sample"),
    (197, 100, 14, 98), (183, 100, 9, "per-sample"),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tokens, c, r, cls", MAP_CASES)
def test_fusion_map_equals_the_torch_matching_and_map(tokens, c, r, cls, dtype):
    """kernels/fusion.py's fusion_map against token_fusion's torch functions (bipartite matching, fusion_indices,
    merged_size), index for index, and both against the matching by its definition. The scores are exact
    (exact_metric) and tie often, within rows and between them; sample 1 also repeats an A token's row and sample 2
    has two A tokens parallel to one B token (cosine 1): ties go to the earlier token in both (a stable sort), and
    a tie for the best partner to the earlier B token (torch's max, Triton's argmax)."""
    import token_fusion
    x = exact_metric(3, tokens, c, seed=tokens * 100 + r).to(dtype)
    x[1, 4:tokens:4] = x[1, 0]              # A tokens with identical best scores
    x[2, 2] = x[2, 6] = 2 * x[2, 1]
    if cls == "per-sample":
        cls = torch.tensor([1, tokens - 1, tokens // 2])
    src, dst, kept_a = token_fusion.bipartite_soft_matching(x, r, cls)
    want_src, want_dst = exact_matching(x, r, cls)
    assert torch.equal(src, want_src) and torch.equal(dst, want_dst)
    keep, dst_out, dest, cls_out = token_fusion.fusion_indices(src, dst, kept_a, tokens, "released", cls)
    weight = token_fusion.merged_size(keep, src, dst_out)
    on = cls.to(DEVICE) if isinstance(cls, torch.Tensor) else cls
    got = kt.fusion_map(x.to(DEVICE), r, on)
    for name, want, have in zip(("src", "keep", "dst_out", "dest", "weight"), (src, keep, dst_out, dest, weight), got):
        assert have.dtype == want.dtype and torch.equal(have.cpu(), want), name
    if isinstance(cls_out, torch.Tensor):
        assert torch.equal(got[5].cpu(), cls_out)
    else:
        assert got[5] == cls_out


def test_fuse_uses_fusion_map_up_to_its_token_limit_and_torch_beyond(monkeypatch):
    """Past FUSION_MAP_MAX_TOKENS (more scores than a program holds) fuse falls back to the torch matching, with
    the same result; at the limit it takes the kernel (exact scores, exact_metric, so that it matches as torch does)."""
    import token_fusion
    calls = []
    real = kt.fusion_map
    monkeypatch.setattr(kt, "fusion_map", lambda *a: calls.append(a[0].shape[1]) or real(*a))
    for tokens in (kt.FUSION_MAP_MAX_TOKENS, kt.FUSION_MAP_MAX_TOKENS + 1):
        g = torch.Generator().manual_seed(tokens)
        hidden = exact_metric(2, tokens, 8, seed=tokens).to(DEVICE)
        residual = torch.randn(2, tokens, 8, generator=g).to(DEVICE)
        results = []
        for kernels in (True, False):
            monkeypatch.setattr(token_fusion, "_use_kernels", lambda x, on=kernels: on)
            results.append(token_fusion.fuse(hidden, residual, 20, tokens // 2)[:3])
        for a, b in zip(*results):
            assert torch.allclose(a.cpu(), b.cpu(), rtol=1e-6, atol=1e-6)
    assert calls == [kt.FUSION_MAP_MAX_TOKENS]


@pytest.mark.parametrize("order", ["released", "spatial"])
@pytest.mark.parametrize("case", ["head", "middle"])
def test_source_map_through_the_kernels_is_the_hand_worked_one(monkeypatch, case, order):
    """test_token_fusion's two-layer source-map examples with the fusion on kernels/fusion.py (fusion_map's dest in
    order "released", the Triton merge in both): the same groups after each layer."""
    import token_fusion
    from test_token_fusion import TRACE_CASES, held
    monkeypatch.setattr(token_fusion, "_use_kernels", lambda x: True)
    cls, layer1, table = TRACE_CASES[case]
    layer2, groups1, groups2, (c1, c2) = table[order]
    on = lambda rows: torch.tensor([rows], device=DEVICE)  # noqa: E731  (exact in float32)
    source = token_fusion.identity_source(1, 9, DEVICE)
    residual = torch.randn(1, 9, 4).to(DEVICE)
    _, res1, cls1, _, source1 = token_fusion.fuse(on(layer1), residual, 2, cls, order=order, source=source)
    _, _, cls2, _, source2 = token_fusion.fuse(on(layer2), res1, 2, cls1, order=order, source=source1)
    assert held(source1[0].cpu(), 7) == groups1 and held(source2[0].cpu(), 5) == groups2
    assert [int(torch.as_tensor(c).view(-1)[0]) for c in (cls1, cls2)] == [c1, c2]


@pytest.mark.parametrize("cls_position, order", [("head", "released"), ("middle", "released"), ("middle", "spatial")])
def test_model_source_maps_with_kernel_fusion_equal_the_torch_path(monkeypatch, source_maps_both_ways,
                                                                   matching_margins, cls_position, order):
    """A tiny Vim's per-layer source maps with the fusion on kernels/fusion.py (forced on, interpreted on the CPU)
    equal those of the torch fusion, layer for layer."""
    import models_mamba
    torch.manual_seed(0)
    model = models_mamba.VisionMamba(img_size=32, patch_size=8, depth=4, embed_dim=16, d_state=4, num_classes=5,
                                     drop_path_rate=0.0, ssm_backend="torch", cls_position=cls_position,
                                     fusion_strategy="all", fusion_token=3, fusion_order=order).eval().to(DEVICE)
    calls, real = [], kt.fusion_map
    monkeypatch.setattr(kt, "fusion_map", lambda *a: calls.append(1) or real(*a))
    maps = source_maps_both_ways(model, torch.randn(3, 3, 32, 32).to(DEVICE))
    assert [s.shape for s in maps[0]] == [(3, 17)] * 4
    for layer, (a, b) in enumerate(zip(*maps)):
        assert torch.equal(a.cpu(), b.cpu()), layer
    assert int(maps[0][-1].max()) + 1 == 17 - 4 * 3
    assert len(calls) == (4 if order == "released" else 0)  # the kernel matching ran in each fused layer
    assert len(matching_margins) == (4 if order == "released" else 8) and min(matching_margins) > 1e-5
