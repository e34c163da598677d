"""The main job: one MoE layer round (forward and backward) on a multi-rank gloo world, cross-checked.

router -> get_dispatch_layout -> dispatch -> per-expert MLP -> combine, then the backward pass
(cached dispatch of the output gradient -> expert backward -> combine of the input gradients).
Every communication op is compared bit for bit with the executable spec (reference/), and the layer's
output and gradients with a single-process dense MoE built from the same seeded weights.

    python tools/moe_round.py                 # 4 ranks, default backend, float32 compute
    python tools/moe_round.py --ranks 3 --dtype bfloat16 --tokens 64

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
from deep_ep.testing import run_ranks  # noqa: E402
from deep_ep.testing.compare import first_mismatch  # noqa: E402


def build_model(cfg: dict) -> dict:
    """Every rank's tokens and the layer's weights, identical in every process (one seeded generator)."""
    gen = torch.Generator().manual_seed(cfg["seed"])
    hidden, ffn, experts = cfg["hidden"], cfg["ffn"], cfg["experts"]
    return {
        "x": [torch.randn(cfg["tokens"], hidden, generator=gen) for _ in range(cfg["ranks"])],
        "router": torch.randn(hidden, experts, generator=gen) / hidden**0.5,
        "w1": torch.randn(experts, hidden, ffn, generator=gen) / hidden**0.5,
        "w2": torch.randn(experts, ffn, hidden, generator=gen) / ffn**0.5,
        "dy": [torch.randn(cfg["tokens"], hidden, generator=gen) for _ in range(cfg["ranks"])],
    }


def route(x: torch.Tensor, router: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax router: (topk_idx int64 [N, K], topk_weights float32 [N, K])."""
    probs = torch.softmax(x.float() @ router, dim=-1)
    weights, idx = probs.topk(top_k, dim=-1)
    return idx, weights


def experts_forward(
    x: torch.Tensor, local_idx: torch.Tensor, weights: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor
) -> torch.Tensor:
    """Per received row: sum over its local experts l of weight * W2_l(gelu(W1_l x)) (float32)."""
    out = torch.zeros(x.shape, dtype=torch.float32)
    for k in range(local_idx.shape[1]):
        valid = local_idx[:, k] >= 0
        expert = local_idx[:, k].clamp(min=0)
        h = torch.nn.functional.gelu(torch.bmm(x.float().unsqueeze(1), w1[expert]))
        y = torch.bmm(h, w2[expert]).squeeze(1)
        out = out + torch.where(valid.unsqueeze(1), weights[:, k : k + 1] * y, torch.zeros_like(y))
    return out


def dense_moe(model: dict, cfg: dict) -> dict:
    """The same layer in one process over all tokens: output, and gradients of x, weights, experts."""
    x = torch.cat(model["x"]).float().to(cfg["dtype"]).float().requires_grad_()
    w1, w2 = model["w1"].clone().requires_grad_(), model["w2"].clone().requires_grad_()
    idx, weights = route(x.detach(), model["router"], cfg["topk"])
    weights = weights.clone().requires_grad_()
    y = experts_forward(x, idx, weights, w1, w2)
    y.backward(torch.cat(model["dy"]).to(cfg["dtype"]).float())
    return {"y": y.detach(), "dx": x.grad, "dw": weights.grad, "dw1": w1.grad, "dw2": w2.grad}


def _timed(times: dict, name: str, fn, *args, **kwargs):
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    times.setdefault(name, []).append(time.perf_counter() - start)
    return out


def _rank_round(rank: int, world: int, cfg: dict) -> dict:
    torch.manual_seed(0)
    dtype = cfg["dtype"]
    model = build_model(cfg)
    experts, local = cfg["experts"], cfg["experts"] // world
    mine = slice(rank * local, (rank + 1) * local)
    buffer = Buffer(dist.group.WORLD, backend=cfg["backend"])
    xs = [x.to(dtype) for x in model["x"]]
    dys = [dy.to(dtype) for dy in model["dy"]]
    routes = [route(x, model["router"], cfg["topk"]) for x in xs]
    times: dict[str, list[float]] = {}
    checks: dict[str, str | None] = {}

    for _ in range(cfg["iters"]):  # identical rounds: the first warms up, the others are timed
        dist.barrier()  # time the ops, not the ranks' skew
        w1 = model["w1"][mine].clone().requires_grad_()
        w2 = model["w2"][mine].clone().requires_grad_()
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
        recv_x = recv_x.float().requires_grad_()
        recv_w = recv_w.clone().requires_grad_()
        expert_out = experts_forward(recv_x, recv_idx, recv_w, w1, w2)
        y, _, _ = _timed(times, "combine", buffer.combine, expert_out.detach().to(dtype), handle)
        grad_out, *_ = _timed(times, "dispatch (cached, backward)", buffer.dispatch, dys[rank], handle=handle)
        expert_out.backward(grad_out.float())
        dx, dw, _ = _timed(
            times, "combine (backward)", buffer.combine, recv_x.grad.to(dtype), handle, topk_weights=recv_w.grad
        )
    # Bit-for-bit against the executable spec: every rank's view of the whole world.
    spec_layout = reference.layout([r[0] for r in routes], experts)
    in_ranks = [lay["is_token_in_rank"] for lay in spec_layout]
    spec = reference.dispatch(
        xs,
        in_ranks,
        [lay["num_tokens_per_expert"] for lay in spec_layout],
        [r[0] for r in routes],
        [r[1] for r in routes],
        experts,
    )
    checks["get_dispatch_layout"] = first_mismatch(in_rank, spec_layout[rank]["is_token_in_rank"]) or first_mismatch(
        per_expert, spec_layout[rank]["num_tokens_per_expert"]
    )
    checks["dispatch"] = first_mismatch(recv_x.detach().to(dtype), spec[rank]["recv_x"]) or first_mismatch(
        recv_w.detach(), spec[rank]["recv_topk_weights"]
    )
    outs, grads_x, grads_w = [], [], []
    spec_grad = reference.cached_dispatch(dys, in_ranks)
    for d in range(world):  # every rank's expert math, redone here from the spec's inputs
        sx = spec[d]["recv_x"].float().requires_grad_()
        sw = spec[d]["recv_topk_weights"].clone().requires_grad_()
        block = slice(d * local, (d + 1) * local)
        out = experts_forward(sx, spec[d]["recv_topk_idx"], sw, model["w1"][block], model["w2"][block])
        out.backward(spec_grad[d].float())
        outs.append(out.detach().to(dtype))
        grads_x.append(sx.grad.to(dtype))
        grads_w.append(sw.grad)
    checks["combine"] = first_mismatch(y, reference.combine(outs, in_ranks)[rank]["combined_x"])
    checks["dispatch (cached, backward)"] = first_mismatch(grad_out, spec_grad[rank])
    spec_back = reference.combine(grads_x, in_ranks, grads_w)[rank]
    checks["combine (backward)"] = first_mismatch(dx, spec_back["combined_x"]) or first_mismatch(
        dw, spec_back["combined_topk_weights"]
    )
    # Against the dense single-process layer.
    dense = dense_moe(model, cfg)
    tokens = slice(rank * cfg["tokens"], (rank + 1) * cfg["tokens"])
    errors = {
        "output y": _rel_err(y.float(), dense["y"][tokens]),
        "grad x": _rel_err(dx.float(), dense["dx"][tokens]),
        "grad topk_weights": _rel_err(dw, dense["dw"][tokens]),
        "grad expert weights": max(_rel_err(w1.grad, dense["dw1"][mine]), _rel_err(w2.grad, dense["dw2"][mine])),
    }
    moved = {
        "dispatch": (recv_x.shape[0], int(per_rank.sum()) - int(in_rank[:, rank].sum())),
        "combine": (recv_x.shape[0], int(per_rank.sum()) - int(in_rank[:, rank].sum())),
    }
    row_bytes = cfg["hidden"] * torch.empty((), dtype=dtype).element_size()
    return {
        "times": {name: statistics.median(ts[1:] or ts) for name, ts in times.items()},
        "checks": checks,
        "errors": errors,
        "recv_rows": moved["dispatch"][0],
        "sent_remote_rows": moved["dispatch"][1],
        "row_bytes": row_bytes,
        "backend": buffer.backend,
    }


def _rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    scale = expected.abs().max().item() or 1.0
    return (actual.float() - expected.float()).abs().max().item() / scale


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ranks", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=128, help="tokens per rank")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--ffn", type=int, default=128)
    parser.add_argument("--experts", type=int, default=16)
    parser.add_argument("--topk", type=int, default=4)
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--iters", type=int, default=5, help="rounds; times are medians after the first")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    cfg = dict(vars(args), dtype=getattr(torch, args.dtype))
    # fp32 compute: only the summation order differs from the dense layer; bf16 adds one rounding per hop.
    tolerance = 1e-5 if args.dtype == "float32" else 2e-2

    results = run_ranks(args.ranks, _rank_round, cfg, timeout=600)
    ops = ["get_dispatch_layout", "dispatch", "combine", "dispatch (cached, backward)", "combine (backward)"]
    moves_data = {"dispatch", "combine", "dispatch (cached, backward)", "combine (backward)"}
    recv_rows = sum(r["recv_rows"] for r in results)
    remote_rows = sum(r["sent_remote_rows"] for r in results)
    row_bytes = results[0]["row_bytes"]
    print(
        f"deep_ep MoE round: backend={results[0]['backend']} ranks={args.ranks} tokens/rank={args.tokens} "
        f"hidden={args.hidden} experts={args.experts} top-k={args.topk} dtype={args.dtype}"
    )
    header = (
        f"{'check':<36} {'ranks':>5} {'tokens':>7} {'bytes moved':>12} {'cross-rank':>11} {'time/op ms':>10} "
        f"{'max error':>10} {'result':>6}"
    )
    print(header)
    print("-" * len(header))
    failed = False
    for op in ops:
        problems = [f"rank {i}: {r['checks'][op]}" for i, r in enumerate(results) if r["checks"][op]]
        failed |= bool(problems)
        moved = f"{recv_rows * row_bytes:>12,}" if op in moves_data else f"{'-':>12}"
        cross = f"{remote_rows * row_bytes:>11,}" if op in moves_data else f"{'-':>11}"
        ms = max(r["times"][op] for r in results) * 1e3
        print(
            f"{op + ' = spec':<36} {args.ranks:>5} {args.tokens * args.ranks:>7} {moved} {cross} {ms:>10.3f} "
            f"{'0 (bits)' if not problems else 'mismatch':>10} {'PASS' if not problems else 'FAIL':>6}"
        )
        for problem in problems:
            print(f"    {problem}")
    for name in results[0]["errors"]:
        err = max(r["errors"][name] for r in results)
        ok = err <= tolerance
        failed |= not ok
        print(
            f"{name + ' = dense':<36} {args.ranks:>5} {args.tokens * args.ranks:>7} {'-':>12} {'-':>11} {'-':>10} "
            f"{err:>10.2e} {'PASS' if ok else 'FAIL':>6}"
        )
    print(
        f"(bytes moved: received rows incl. own rank, DeepEP's metric; cross-rank: rows between different ranks; "
        f"max error vs dense is relative to the largest magnitude, tolerance {tolerance:g})"
    )
    print("RESULT:", "FAIL" if failed else "PASS")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
