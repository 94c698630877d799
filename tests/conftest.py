import os
import sys
from pathlib import Path

import pytest
import torch

# No GPU: run Triton kernels in the interpreter on CPU tensors. Must be set before triton decorates
# any kernel, i.e. before fastadapt's kernels are imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, str(Path(__file__).parent))

# Deterministic CPU matmuls for tight comparisons.
torch.backends.cuda.matmul.allow_tf32 = False
torch.backends.cudnn.allow_tf32 = False


def pytest_collection_modifyitems(config, items):
    has_cuda = torch.cuda.is_available()
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords and not has_cuda:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    # Converted models are cached under FASTADAPT_CACHE_DIR; share one per session, never ~/.cache.
    cache = os.environ.get("FASTADAPT_TEST_CACHE") or str(tmp_path_factory.getbasetemp() / "fa-cache")
    monkeypatch.setenv("FASTADAPT_CACHE_DIR", cache)
