"""deep_ep.comm: small host exchanges (the agreement check) over a gloo companion group when the group itself
moves only device tensors (NCCL, HCCL). On this CPU-only machine the group is gloo; the test makes `Comm`
treat it as device-only (as it would an NCCL group), so the companion path runs for real over gloo."""

from __future__ import annotations

import torch.distributed as dist

from deep_ep import comm as comm_module
from deep_ep.comm import Comm
from deep_ep.testing import run_ranks


def _exchange(rank: int, world: int) -> tuple[list, list, bool, bool]:
    comm = Comm(dist.group.WORLD)
    comm.device_types = {"cuda"}  # as for an NCCL group: host tensors cannot travel on it
    first = comm.host_all_gather([rank, 10 * rank, -rank], "test")
    companion = comm_module._HOST_COMPANIONS[dist.group.WORLD.group_name]
    second = comm.host_all_gather([7, rank], "test")
    reused = comm_module._HOST_COMPANIONS[dist.group.WORLD.group_name] is companion
    return first, second, companion is not None and companion is not dist.group.WORLD, reused


def test_host_values_travel_on_a_gloo_companion_group() -> None:
    results = run_ranks(3, _exchange)
    for first, second, made, reused in results:
        assert first == [[r, 10 * r, -r] for r in range(3)]
        assert second == [[7, r] for r in range(3)]
        assert made and reused


def _alone(rank: int, world: int) -> list[list[int]]:
    return Comm(dist.group.WORLD).host_all_gather([4, 5], "test")


def test_one_rank_needs_no_exchange() -> None:
    assert run_ranks(1, _alone) == [[[4, 5]]]
