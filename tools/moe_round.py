"""The main job: an MoE layer round (forward and backward) on a multi-rank gloo world, cross-checked.

Two parts, on every rank:
1. `deep_ep.moe.MoELayer` forward and backward; its output and all gradients (input, router, experts) are
   compared with a single-process dense MoE built from the same seeded weights.
2. The same round op by op: router -> get_dispatch_layout -> dispatch -> permute -> per-expert MLP ->
   unpermute -> combine, then backward (cached dispatch of the output gradient -> expert backward ->
   combine of the input gradients); every communication op is compared bit for bit with the executable
   spec (reference/), which recomputes every rank's expert math from its own inputs.

    python tools/moe_round.py                 # 4 ranks, default backend, float32
    python tools/moe_round.py --ranks 3 --experts 12 --dtype bfloat16 --tokens 64

Prints a results table; exits 1 if any check fails.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import reference  # noqa: E402  (the executable spec lives beside the package)
from deep_ep import Buffer  # noqa: E402
from deep_ep.moe import MoELayer, dense_moe, expert_mlp, init_moe_weights, route  # noqa: E402
from deep_ep.permute import permute, unpermute  # noqa: E402
from deep_ep.testing import run_ranks  # noqa: E402
from deep_ep.testing.cli import at_least  # noqa: E402
from deep_ep.testing.compare import first_mismatch  # noqa: E402

OPS = ["get_dispatch_layout", "dispatch", "combine", "dispatch (cached, backward)", "combine (backward)"]


def tokens_of(cfg: dict, name: str) -> list[torch.Tensor]:
    """Every rank's [N, H] tensor `name` ("x" or "dy"), identical in every process."""
    gen = torch.Generator().manual_seed(cfg["seed"] + (1 if name == "x" else 2))
    return [torch.randn(cfg["tokens"], cfg["hidden"], generator=gen).to(cfg["dtype"]) for _ in range(cfg["ranks"])]


def local_experts(recv_x, recv_idx, recv_w, counts, w1, w2) -> torch.Tensor:
    """permute -> one MLP per local expert -> unpermute (weights applied, summed per received row)."""
    grouped = permute(recv_x, recv_idx, w1.shape[0], num_tokens_per_expert=counts)
    outs, start = [], 0
    for e, count in enumerate(counts):
        outs.append(expert_mlp(grouped.permuted_x[start : start + count], w1[e], w2[e]))
        start += count
    return unpermute(torch.cat(outs), grouped.handle, recv_w)


def _timed(times: dict, name: str, fn, *args, **kwargs):
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    times.setdefault(name, []).append(time.perf_counter() - start)
    return out


def _layer_vs_dense(rank: int, world: int, cfg: dict, buffer: Buffer, times: dict) -> dict[str, float]:
    """Part 1: MoELayer forward/backward against the dense layer; relative max errors."""
    xs, dys = tokens_of(cfg, "x"), tokens_of(cfg, "dy")
    layer = MoELayer(
        cfg["hidden"], cfg["ffn"], cfg["experts"], cfg["topk"], buffer=buffer, dtype=cfg["dtype"], seed=cfg["seed"]
    )
    for _ in range(cfg["iters"]):
        layer.zero_grad()
        dist.barrier()
        x = xs[rank].clone().requires_grad_()
        y = _timed(times, "MoELayer forward", layer, x)
        _timed(times, "MoELayer backward", y.backward, dys[rank])
    router_grad = layer.router.grad.float().clone()
    dist.all_reduce(router_grad)  # each rank's router gradient covers its own tokens
    full = init_moe_weights(cfg["hidden"], cfg["ffn"], cfg["experts"], seed=cfg["seed"], dtype=cfg["dtype"])
    for t in (full.router, full.w1, full.w2):
        t.requires_grad_()
    dense_x = [x.clone().requires_grad_() for x in xs]
    dense_y = dense_moe(dense_x, full, cfg["topk"])
    torch.autograd.backward(dense_y, dys)
    mine = slice(rank * layer.num_local_experts, (rank + 1) * layer.num_local_experts)
    return {
        "MoELayer output y": _rel_err(y, dense_y[rank]),
        "MoELayer grad x": _rel_err(x.grad, dense_x[rank].grad),
        "MoELayer grad router": _rel_err(router_grad, full.router.grad),
        "MoELayer grad experts": max(
            _rel_err(_grad(layer.w1), _grad(full.w1)[mine]), _rel_err(_grad(layer.w2), _grad(full.w2)[mine])
        ),
    }


def _grad(t: torch.Tensor) -> torch.Tensor:
    """t's gradient; zeros where autograd left None (no token reached the experts: N = 0 on every rank)."""
    return t.grad if t.grad is not None else torch.zeros_like(t)


def _ops_vs_spec(rank: int, world: int, cfg: dict, buffer: Buffer, times: dict) -> tuple[dict, dict]:
    """Part 2: every op of one round, timed, and compared bit for bit with the executable spec."""
    xs, dys = tokens_of(cfg, "x"), tokens_of(cfg, "dy")
    full = init_moe_weights(cfg["hidden"], cfg["ffn"], cfg["experts"], seed=cfg["seed"], dtype=cfg["dtype"])
    experts, local = cfg["experts"], cfg["experts"] // world
    routes = [route(x, full.router, cfg["topk"]) for x in xs]
    w1, w2 = (w[rank * local : (rank + 1) * local] for w in (full.w1, full.w2))
    for _ in range(cfg["iters"]):  # identical rounds: the first warms up, the others are timed
        dist.barrier()  # time the ops, not the ranks' skew
        idx, weights = routes[rank]
        per_rank, per_rdma, per_expert, in_rank, _ = _timed(
            times, "get_dispatch_layout", buffer.get_dispatch_layout, idx, experts
        )
        recv_x, recv_idx, recv_w, counts, handle, _ = _timed(
            times,
            "dispatch",
            buffer.dispatch,
            xs[rank],
            num_tokens_per_rank=per_rank,
            num_tokens_per_rdma_rank=per_rdma,
            is_token_in_rank=in_rank,
            num_tokens_per_expert=per_expert,
            topk_idx=idx,
            topk_weights=weights,
        )
        recv_x, recv_w = recv_x.clone().requires_grad_(), recv_w.clone().requires_grad_()
        per_row = local_experts(recv_x, recv_idx, recv_w, counts, w1, w2)
        y, _, _ = _timed(times, "combine", buffer.combine, per_row.detach(), handle)
        grad_rows, *_ = _timed(times, "dispatch (cached, backward)", buffer.dispatch, dys[rank], handle=handle)
        per_row.backward(grad_rows)
        dx, dw, _ = _timed(times, "combine (backward)", buffer.combine, recv_x.grad, handle, topk_weights=recv_w.grad)

    # The executable spec, on every rank's inputs; each rank's expert math redone here from the spec's rows.
    lay = reference.layout([r[0] for r in routes], experts)
    in_ranks = [q["is_token_in_rank"] for q in lay]
    spec = reference.dispatch(
        xs, in_ranks, [q["num_tokens_per_expert"] for q in lay], [r[0] for r in routes], [r[1] for r in routes], experts
    )
    spec_grad = reference.cached_dispatch(dys, in_ranks)
    outs, grads_x, grads_w = [], [], []
    for d in range(world):
        sx = spec[d]["recv_x"].clone().requires_grad_()
        sw = spec[d]["recv_topk_weights"].clone().requires_grad_()
        blocks = (w[d * local : (d + 1) * local] for w in (full.w1, full.w2))
        out = local_experts(sx, spec[d]["recv_topk_idx"], sw, spec[d]["num_recv_tokens_per_expert_list"], *blocks)
        out.backward(spec_grad[d])
        outs.append(out.detach())
        grads_x.append(sx.grad)
        grads_w.append(sw.grad)
    back = reference.combine(grads_x, in_ranks, grads_w)[rank]
    checks = {
        "get_dispatch_layout": first_mismatch(in_rank, lay[rank]["is_token_in_rank"])
        or first_mismatch(per_expert, lay[rank]["num_tokens_per_expert"]),
        "dispatch": first_mismatch(recv_x.detach(), spec[rank]["recv_x"])
        or first_mismatch(recv_w.detach(), spec[rank]["recv_topk_weights"]),
        "combine": first_mismatch(y, reference.combine(outs, in_ranks)[rank]["combined_x"]),
        "dispatch (cached, backward)": first_mismatch(grad_rows, spec_grad[rank]),
        "combine (backward)": first_mismatch(dx, back["combined_x"])
        or first_mismatch(dw, back["combined_topk_weights"]),
    }
    moved = {"recv_rows": recv_x.shape[0], "remote_rows": int(per_rank.sum()) - int(in_rank[:, rank].sum())}
    return checks, moved


def _rank_round(rank: int, world: int, cfg: dict) -> dict:
    buffer = Buffer(dist.group.WORLD, backend=cfg["backend"])
    times: dict[str, list[float]] = {}
    errors = _layer_vs_dense(rank, world, cfg, buffer, times)
    checks, moved = _ops_vs_spec(rank, world, cfg, buffer, times)
    return {
        "times": {name: statistics.median(ts[1:] or ts) for name, ts in times.items()},
        "checks": checks,
        "errors": errors,
        "row_bytes": cfg["hidden"] * torch.empty((), dtype=cfg["dtype"]).element_size(),
        "backend": buffer.backend,
        **moved,
    }


def _rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    if actual.numel() == 0 and expected.numel() == 0:  # N = 0 tokens is a valid round; max() of nothing raises
        return 0.0
    scale = expected.detach().abs().max().item() or 1.0
    return (actual.detach().float() - expected.detach().float()).abs().max().item() / scale


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ranks", type=at_least(1), default=4)
    parser.add_argument("--tokens", type=at_least(0), default=128, help="tokens per rank")
    parser.add_argument("--hidden", type=at_least(1), default=256)
    parser.add_argument("--ffn", type=at_least(1), default=128)
    parser.add_argument("--experts", type=at_least(1), default=16)
    parser.add_argument("--topk", type=at_least(1), default=4)
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--iters", type=at_least(1), default=5, help="rounds; times are medians after the first")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.experts % args.ranks:
        parser.error(f"--experts={args.experts} must be a multiple of --ranks={args.ranks}")
    if args.topk > args.experts:
        parser.error(f"--topk={args.topk} is more than --experts={args.experts}")
    cfg = dict(vars(args), dtype=getattr(torch, args.dtype))
    # float32: only the summation order differs from the dense layer; bf16 adds a rounding per hop.
    tolerance = 1e-5 if args.dtype == "float32" else 2e-2

    results = run_ranks(args.ranks, _rank_round, cfg, timeout=900)
    recv_bytes = sum(r["recv_rows"] for r in results) * results[0]["row_bytes"]
    remote_bytes = sum(r["remote_rows"] for r in results) * results[0]["row_bytes"]
    print(
        f"deep_ep MoE round: backend={results[0]['backend']} ranks={args.ranks} tokens/rank={args.tokens} "
        f"hidden={args.hidden} experts={args.experts} top-k={args.topk} dtype={args.dtype}"
    )
    header = (
        f"{'check':<36} {'ranks':>5} {'tokens':>7} {'bytes moved':>12} {'cross-rank':>11} "
        f"{'time/op ms':>10} {'max error':>10} {'result':>6}"
    )
    print(header)
    print("-" * len(header))
    tokens = args.tokens * args.ranks
    failed = False
    for op in OPS:
        problems = [f"rank {i}: {r['checks'][op]}" for i, r in enumerate(results) if r["checks"][op]]
        failed |= bool(problems)
        moves = op != "get_dispatch_layout"
        moved = f"{recv_bytes:>12,}" if moves else f"{'-':>12}"
        cross = f"{remote_bytes:>11,}" if moves else f"{'-':>11}"
        ms = max(r["times"][op] for r in results) * 1e3
        print(
            f"{op + ' = spec':<36} {args.ranks:>5} {tokens:>7} {moved} {cross} {ms:>10.3f} "
            f"{'0 (bits)' if not problems else 'mismatch':>10} {'PASS' if not problems else 'FAIL':>6}"
        )
        for problem in problems:
            print(f"    {problem}")
    for name in results[0]["errors"]:
        err = max(r["errors"][name] for r in results)
        ok = err <= tolerance
        failed |= not ok
        timed = {"MoELayer output y": "MoELayer forward", "MoELayer grad x": "MoELayer backward"}.get(name)
        ms = f"{max(r['times'][timed] for r in results) * 1e3:>10.3f}" if timed else f"{'-':>10}"
        print(
            f"{name + ' = dense':<36} {args.ranks:>5} {tokens:>7} {'-':>12} {'-':>11} {ms} {err:>10.2e} "
            f"{'PASS' if ok else 'FAIL':>6}"
        )
    print(
        f"(bytes moved: rows received incl. the own rank, DeepEP's metric; cross-rank: rows between different "
        f"ranks; time: median over rounds after the first, slowest rank; error vs dense: relative to the largest "
        f"magnitude, tolerance {tolerance:g})"
    )
    print("RESULT:", "FAIL" if failed else "PASS")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
