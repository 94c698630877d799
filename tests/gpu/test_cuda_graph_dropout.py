"""A dropout mask under CUDA graph capture (issue 26): the shrink kernel reads its seed from a device
tensor that torch's generator draws inside the graph, so each replay draws a fresh mask — a host
int would be baked into the graph and every replay would drop the same elements. The CPU test of
the plumbing is tests/ops/test_lora_linear.py::test_seed_under_graph_capture_is_a_device_tensor_the_kernel_reads.
Skipped without a CUDA device; run with TRITON_INTERPRET unset."""

from __future__ import annotations

import os

import pytest
import torch

import fastadapt as fa

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1",
                       reason="needs a CUDA device and compiled Triton kernels"),
]


def test_each_replay_draws_a_fresh_mask():
    # W = 0, A = B = I, scaling 1: y = mask ⊙ x / (1 - p), so the output shows the mask itself
    k, m, p = 256, 512, 0.25
    dev = torch.device("cuda")
    x = torch.randn(m, k, device=dev, dtype=torch.bfloat16).abs() + 0.5
    w = torch.zeros(k, k, device=dev, dtype=torch.bfloat16)
    eye = torch.eye(k, device=dev)

    def step():
        return fa.ops.lora_linear(x, w, eye, eye, scaling=1.0, dropout_p=p, backend="triton")

    step()  # compile and autotune outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = step()
    kept = []
    for _ in range(3):
        graph.replay()
        torch.cuda.synchronize()
        keep = y != 0
        torch.testing.assert_close(y[keep].float(), (x[keep].float() / (1 - p)).to(torch.bfloat16).float())
        assert abs(keep.float().mean().item() - (1 - p)) < 0.02
        kept.append(keep.clone())
    assert not torch.equal(kept[0], kept[1]) and not torch.equal(kept[1], kept[2])
