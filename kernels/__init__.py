"""Layer 1: the Triton kernels and their launchers (math only: no ``torch.nn``, no autograd).

This folder sits at the top of the repository and is installed as ``fastadapt.kernels`` (a
package-dir mapping in pyproject.toml); import it under that one name only.
"""
