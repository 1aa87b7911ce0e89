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
