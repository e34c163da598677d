"""Upstream DeepEP (its v1 `Buffer`) measured the way tools/bench.py measures deep_ep: same workloads, timing,
byte accounting, raw all_to_all_single baseline and JSON schema, so the reports merge side by side.

The upstream `deep_ep` is imported from its own install directory, put first on sys.path; this program never
imports this repository's `deep_ep` (it checks where the module came from). It needs CUDA GPUs and NCCL, one
process per GPU (torchrun, or the spawn launcher with `--launcher local`).

    python3 -m pip install -q --no-index --no-deps --target /tmp/upstream .whl/tokenspeed_deepep-*.whl
    PYTHONPATH=/tmp/upstream torchrun --standalone --nproc-per-node 4 tools/bench_deepep.py \\
        --upstream-dir /tmp/upstream --launcher torchrun --dist-backend nccl --mode normal \\
        --tokens 4096 --dtype bfloat16 fp8 --json upstream_normal.json
    python3 tools/bench.py --merge ours.json upstream_normal.json --plot side_by_side.png

Buffers are sized as DeepEP's README and tests do: normal mode `num_nvl_bytes` = the larger
`Config.get_nvl_buffer_size_hint(hidden * 2, R)` of the default dispatch and combine configs; low-latency mode
`num_rdma_bytes = Buffer.get_low_latency_rdma_size_hint(T, H, R, E)` with `num_qps_per_rank = E / R`.
Calls use DeepEP's default configs (Buffer.num_sms = 20).
"""

from __future__ import annotations

import argparse
import ctypes
import glob
import os
import site
import sys
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

TOOLS = os.path.dirname(os.path.abspath(__file__))
REPO_ROOT = os.path.dirname(TOOLS)
if TOOLS not in sys.path:
    sys.path.insert(0, TOOLS)

import bench as harness  # noqa: E402  (tools/bench.py: the shared harness; it does not import deep_ep)

DISTRIBUTION = "tokenspeed-deepep"


def _preload_nvshmem() -> None:
    """Load libnvshmem_host.so.3 from the nvidia-nvshmem wheel if present: the upstream extension needs it and
    its RUNPATH points at the build machine's site-packages."""
    dirs = list(getattr(site, "getsitepackages", list)()) + [site.getusersitepackages()] + sys.path
    for directory in dirs:
        for path in sorted(glob.glob(os.path.join(directory, "nvidia", "nvshmem", "lib", "libnvshmem_host.so*"))):
            try:
                ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
                return
            except OSError:
                continue


def _inside(path: str, directory: str) -> bool:
    path, directory = os.path.realpath(path), os.path.realpath(directory)
    return path == directory or path.startswith(directory + os.sep)


@dataclass
class UpstreamDeepEP(harness.Impl):
    """DeepEP's own `deep_ep` package, imported from `upstream_dir` (first on sys.path)."""

    upstream_dir: str | None = None
    # DeepEP flips its low-latency buffer on the host at every call: a graph of one op alone would replay
    # into one buffer and read the previous replay's signals.
    ll_op_alone_capturable: bool = False

    def module(self) -> Any:
        if self.upstream_dir and (not sys.path or sys.path[0] != self.upstream_dir):
            sys.path.insert(0, self.upstream_dir)
        if "deep_ep" not in sys.modules:
            _preload_nvshmem()
        import deep_ep

        origin = getattr(deep_ep, "__file__", None) or "?"
        if _inside(origin, REPO_ROOT) or hasattr(deep_ep, "list_backends"):
            raise RuntimeError(f"'import deep_ep' found this repository's package ({origin}), not upstream DeepEP")
        if self.upstream_dir and not _inside(origin, self.upstream_dir):
            raise RuntimeError(f"'import deep_ep' found {origin}, outside --upstream-dir {self.upstream_dir}")
        return deep_ep

    @property
    def index_dtype(self) -> torch.dtype:  # DeepEP's topk_idx_t (int64 in most builds)
        return getattr(self.module(), "topk_idx_t", torch.int64)

    def normal_buffer(self, group: dist.ProcessGroup, hidden: int, num_ranks: int) -> Any:
        module = self.module()
        return module.Buffer(group, num_nvl_bytes=harness.nvl_bytes_hint(module, hidden, num_ranks))

    def ll_buffer(self, group: dist.ProcessGroup, tokens: int, hidden: int, num_ranks: int, num_experts: int) -> Any:
        module = self.module()
        rdma = module.Buffer.get_low_latency_rdma_size_hint(tokens, hidden, num_ranks, num_experts)
        return module.Buffer(
            group,
            num_nvl_bytes=0,
            num_rdma_bytes=rdma,
            low_latency_mode=True,
            num_qps_per_rank=num_experts // num_ranks,
            allow_nvlink_for_low_latency_mode=True,
        )

    def _version(self) -> str:
        from importlib import metadata

        try:
            return metadata.version(DISTRIBUTION)
        except metadata.PackageNotFoundError:
            return "unknown version"

    def label(self, buffer: Any) -> str:
        return f"upstream DeepEP ({DISTRIBUTION} {self._version()})"

    def metadata(self) -> dict:
        module = self.module()
        return {
            "package": "upstream DeepEP",
            "distribution": DISTRIBUTION,
            "version": self._version(),
            "module_file": module.__file__,
            "sm90_compiled": bool(module.Buffer.is_sm90_compiled()),
            "num_sms": module.Buffer.num_sms,
        }


def build_parser() -> argparse.ArgumentParser:
    parser = harness.build_parser(description=__doc__)
    parser.add_argument("--upstream-dir", help="install directory of the upstream deep_ep (put first on sys.path)")
    parser.set_defaults(dist_backend="nccl")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Measure upstream DeepEP; same options and report as tools/bench.py (--backend is ignored)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.merge:
        return harness.main(argv, program="tools/bench_deepep.py", parser=parser)
    upstream_dir = os.path.abspath(args.upstream_dir) if args.upstream_dir else None
    impl = UpstreamDeepEP(upstream_dir)
    impl.module()  # fail early, and before any process starts, if the wrong deep_ep is found
    return harness.main(argv, impl=impl, program="tools/bench_deepep.py", parser=parser)


if __name__ == "__main__":
    sys.exit(main())
