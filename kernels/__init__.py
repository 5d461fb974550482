"""Triton kernels and their launchers (installed as ``fastlm.kernels``).

No autograd and no modules here: a launcher takes tensors, allocates outputs, picks block
sizes and launches. One file per op family; each exposes ``compile_specs()`` for the static
GPU check (``python -m fastlm.kernels.compile_check``).
"""
