"""Layer 1: the Triton kernels and their launchers (math only: no ``torch.nn``, no autograd).

Installed as ``fastadapt.kernels`` (a package-dir mapping in pyproject.toml); import it under that
one name only. This folder sits one level below the repository's top-level ``kernels/`` so that
``kernels/`` (no ``__init__.py``) never shadows Hugging Face's ``kernels`` package: see
``kernels/README.md``.
"""
