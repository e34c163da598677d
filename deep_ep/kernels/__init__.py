"""Device kernels written in Python (Triton), each next to a torch fallback that gives the same bits.

Importing this package (or any module in it but the `triton_*` ones) never imports Triton: a CPU install
must keep working, and the fallbacks are what the CPU tests check the kernels' contracts against.
CUDA C++ kernels, when there are any, live in `kernels/cuda/` at the repository root (built by setup.py).
"""
