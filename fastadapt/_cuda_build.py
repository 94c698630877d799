"""How the CUDA extension (csrc/) is compiled: one home for the flags of the prebuilt build
(setup.py), the build on first use (fastadapt/ops/_native.py) and CI's compile check
(.ci/check_csrc.sh). Plain Python with no imports: setup.py loads this file by path, before the
package is installed.

Targets: SASS for A100-class GPUs (sm_80, which also runs on sm_86/89) and H100/H200 (sm_90a, the
Hopper-specific instructions), plus compute_80 PTX, which the driver compiles for any newer GPU
(Blackwell included) so the extension still runs there — at sm_80 code quality until a build lists
that GPU. ``TORCH_CUDA_ARCH_LIST`` (e.g. ``"9.0a"``, ``"8.0;9.0a;10.0+PTX"``), when set, replaces
these targets: torch then derives the ``-gencode`` flags (gpu-check.sh builds only the GPU it runs on).

No ``-std``: torch's build helpers pick the standard its headers need (C++17 up to torch 2.9, C++20
after); the code is C++17, and CI compiles it as C++17.
"""

ARCH_FLAGS = (
    "-gencode=arch=compute_80,code=sm_80",
    "-gencode=arch=compute_90a,code=sm_90a",
    "-gencode=arch=compute_80,code=compute_80",  # embedded PTX: JIT-compiled by the driver on newer GPUs
)
NVCC_FLAGS = ("-O3", "-lineinfo", "-DNDEBUG")
CXX_FLAGS = ("-O3", "-DNDEBUG")


def arch_flags(environ) -> list[str]:
    """The -gencode flags to pass, given the environment: none when TORCH_CUDA_ARCH_LIST decides."""
    return [] if environ.get("TORCH_CUDA_ARCH_LIST") else list(ARCH_FLAGS)


if __name__ == "__main__":  # .ci/check_csrc.sh reads the flags from here
    import sys

    print(" ".join({"arch": ARCH_FLAGS, "nvcc": NVCC_FLAGS, "cxx": CXX_FLAGS}[sys.argv[1]]))
