"""Install deep_ep (distribution "deepep-portable").

A pure-Python install always works. Kernel extensions under csrc/ and kernels/ are built only where
their toolchain is present: torch must be importable at build time (`pip install --no-build-isolation .`)
and report the matching device toolkit; otherwise they are skipped and the backends that need them
report themselves unavailable.
"""

from __future__ import annotations

import os

from setuptools import find_packages, setup


def kernel_extensions() -> tuple[list, dict]:
    """(ext_modules, cmdclass) for the kernel backends whose toolchain is here; empty otherwise."""
    if os.environ.get("DEEP_EP_PURE_PYTHON") == "1":
        return [], {}
    try:  # an isolated build environment has no torch: pure-Python install
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        return [], {}
    sources = sorted(
        os.path.join(root, name)
        for root, _, names in os.walk("csrc")
        for name in names
        if name.endswith((".cpp", ".cu"))
    )
    if not sources or torch.version.cuda is None or cpp_extension.CUDA_HOME is None:
        return [], {}
    extension = cpp_extension.CUDAExtension(
        "deep_ep_cpp",
        sources,
        include_dirs=[os.path.abspath("kernels/cuda")],
        extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3", "-gencode=arch=compute_90a,code=sm_90a"]},
    )
    return [extension], {"build_ext": cpp_extension.BuildExtension}


def torch_npu_requirement() -> str:
    """torch-npu X.Y.* for the installed torch X.Y (torch_npu releases pin torch==X.Y.*), where torch is
    visible at build time (`--no-build-isolation`); else unpinned: then pin torch in the same pip command."""
    try:
        from importlib.metadata import version

        major, minor = version("torch").split(".")[:2]
        return f"torch-npu=={major}.{minor}.*"
    except Exception:  # no torch visible to the build
        return "torch-npu"


ext_modules, cmdclass = kernel_extensions()

setup(
    name="deepep-portable",
    version="0.1.0",
    description="DeepEP-compatible expert-parallel dispatch/combine for PyTorch: reference, Ascend and CUDA backends",
    long_description=open("README.md", encoding="utf-8").read() if os.path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["deep_ep", "deep_ep.*"]),
    package_data={"deep_ep.kernels": ["*.c"]},  # the host kernel's source, compiled on first use
    # Any torch from 2.4 on: an installed torch is never upgraded by this requirement.
    install_requires=["torch>=2.4"],
    extras_require={
        # Triton (CPU interpreter) runs the cuda backend's kernels on the CPU in tests/test_cuda_backend.py; numpy:
        # tests pass numpy arrays and integers where DeepEP users do.
        "test": ["pytest>=8", "pytest-xdist>=3", "hypothesis>=6", "triton>=3.2", "numpy"],
        "bench": ["matplotlib>=3.7"],
        "ascend": [torch_npu_requirement()],
    },
    entry_points={"console_scripts": []},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
