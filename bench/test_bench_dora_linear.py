"""Kernel-level benchmark of one DoRA linear (``fa.ops.dora_linear``), on the LoRA benchmark's
machinery (``test_bench_lora_linear.py``: input rotation, do_bench medians, floors, records).

Variants, all bf16 activations and base weight (suite ``dora_linear``):
- ``frozen``           the frozen base ``nn.Linear`` (every other variant's ``ratio_to_ref``);
- ``peft_default``     PEFT's DoRA (``use_dora=True``) as users run it: fp32 adapters;
- ``peft_bf16``        PEFT's DoRA with bf16 adapters;
- ``addmm``            the torch twin (``fa.ops.dora_linear_ref``, the row norms without an N×K sum);
- ``fastadapt``        ``fa.ops.dora_linear(..., backend="triton")``, default variant (forward: cuBLAS +
                       the DoRA epilogue); ``fastadapt_fused``: the fused Triton GEMM variant;
- ``fastadapt_lora``   our LoRA (``fa.ops.lora_linear``, default variant) at the same point: what
                       DoRA costs over LoRA.

Default run: the three LLaMA shapes, r=16, M ∈ {16, 8192}, dropout 0 and 0.1 (0.1 runs PEFT's
dropout form: a second frozen GEMM forward and in dX), three modes. ``--bench-full`` adds r ∈ {8, 64}
and M ∈ {1, 512, 4096, 16384}. Without CUDA only the ``smoke`` cases run (tiny shape, every variant).
Predictions: bench/NOTES.md (DoRA section).
"""

from __future__ import annotations

import benchlib
import pytest
import torch
from test_bench_lora_linear import DROPOUTS, MODES, SHAPES, _run, modes_for, run_smoke

DORA_VARIANTS = ("peft_default", "peft_bf16", "addmm", "fastadapt", "fastadapt_fused", "fastadapt_lora")
M_DEFAULT = (16, 8192)
M_FULL = (1, 512, 4096, 16384)
RANK = 16
RANKS_FULL = (8, 64)


def _cases():
    cases = []
    for K, N in SHAPES:
        for M in (*M_DEFAULT, *M_FULL):
            for mode in modes_for(M):
                full = [pytest.mark.full] if M in M_FULL else []
                cases.append(pytest.param("frozen", mode, M, K, N, 0, 0.0, marks=full,
                                          id=f"{mode}-K{K}xN{N}-M{M}-frozen"))
                for r in (RANK, *RANKS_FULL):
                    marks = [pytest.mark.full] if (M in M_FULL or r != RANK) else []
                    for p in DROPOUTS:
                        for variant in DORA_VARIANTS:
                            cases.append(pytest.param(variant, mode, M, K, N, r, p, marks=marks,
                                                      id=f"{mode}-K{K}xN{N}-M{M}-r{r}-p{p:g}-{variant}"))
    return cases


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (GPU benchmark)")
@pytest.mark.parametrize("variant,mode,M,K,N,r,p", _cases())
def test_dora_linear(benchmark, variant, mode, M, K, N, r, p):
    _run(benchmark, suite="dora_linear", shape_name=f"K{K}xN{N}", variant=variant, mode=mode, M=M, K=K, Ns=(N,),
         r=r, p=p, device=torch.device("cuda"), rounds=benchlib.env_int("FASTADAPT_BENCH_ROUNDS", 5), cpu_iters=0,
         dora=True)


@pytest.mark.smoke
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("variant", ("frozen", *DORA_VARIANTS))
def test_smoke_dora_linear(benchmark, variant, mode):
    run_smoke(benchmark, variant, mode, suite="dora_linear", dora=True)
