import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if not torch.cuda.is_available():  # Triton kernels run on the CPU in Triton's interpreter; set before import
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors: intra-op threads only add overhead (and stall badly on a loaded 2-core machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def source_maps_both_ways(monkeypatch):
    """model, images -> (source maps with token_fusion on kernels/fusion.py, the same with the torch fusion):
    the per-layer source maps of one no-grad forward pass each (VisionMamba.forward's ``sources``)."""
    import token_fusion

    def run(model, images):
        maps = []
        for kernels in (True, False):
            monkeypatch.setattr(token_fusion, "_use_kernels", lambda x, on=kernels: on)
            sources = []
            with torch.no_grad():
                model(images, sources)
            maps.append(sources)
        return maps
    return run


@pytest.fixture
def matching_margins(monkeypatch):
    """Records, for every token_fusion.bipartite_soft_matching call, how far its decisions are from a tie, from the
    float64 cosine scores of its metric: the smallest gap between a fused A token's best and second-best partner
    and between the r-th and (r+1)-th best score. Tests that expect two differently rounded computations to fuse
    the same tokens assert that these gaps dwarf float32 rounding, so the same inputs fuse alike on every CPU."""
    import token_fusion
    margins, real = [], token_fusion.bipartite_soft_matching

    def recording(metric, r, cls_index=None):
        m = torch.nn.functional.normalize(metric.detach().double(), dim=-1)
        scores = m[:, ::2] @ m[:, 1::2].transpose(1, 2)
        cls = torch.as_tensor(cls_index if cls_index is not None else -1).expand(m.shape[0]).to(m.device)
        protected = torch.arange(m.shape[1], device=m.device) == cls[:, None]
        scores = scores.masked_fill(protected[:, ::2, None] | protected[:, None, 1::2], float("-inf"))
        top2 = scores.topk(2, dim=-1).values                            # (B, nA, 2)
        ranked = top2[..., 0].sort(dim=-1, descending=True).values      # (B, nA)
        fused = top2[..., 0] >= ranked[:, r - 1:r]                      # the r fused A tokens
        partner_gap = (top2[..., 0] - top2[..., 1])[fused].min()
        margins.append(min(partner_gap.item(), (ranked[:, r - 1] - ranked[:, r]).min().item()))
        return real(metric, r, cls_index)

    monkeypatch.setattr(token_fusion, "bipartite_soft_matching", recording)
    return margins
