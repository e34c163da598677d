"""Test support shared by tests/ and tools/: the multi-rank launcher and seeded workloads."""

from .launcher import RankFailure, run_ranks

__all__ = ["run_ranks", "RankFailure"]
