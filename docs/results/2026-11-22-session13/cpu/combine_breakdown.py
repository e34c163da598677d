import os, sys, time, statistics, torch, torch.distributed as dist, torch.multiprocessing as mp
sys.path.insert(0, os.getcwd())
import deep_ep
from deep_ep import comm as comm_mod
from deep_ep.backends import reference as ref
from tools.bench import make_routing, make_x
T = {}
def wrap(owner, name, label):
    f = getattr(owner, name)
    def w(*a, **k):
        t = time.perf_counter(); r = f(*a, **k); T.setdefault(label, []).append(time.perf_counter() - t); return r
    setattr(owner, name, w)
def run(rank, R, N):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="29544")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=R)
    buf = deep_ep.Buffer(dist.group.WORLD)
    idx, w = make_routing(rank, N, 256, 8, seed=0, drop=0.0)
    x = make_x(rank, N, 7168)
    l = buf.get_dispatch_layout(idx, 256)
    recv_x, _, _, _, handle, _ = buf.dispatch(x, num_tokens_per_rank=l[0], num_tokens_per_rdma_rank=l[1], is_token_in_rank=l[3], num_tokens_per_expert=l[2], topk_idx=idx, topk_weights=w)
    wrap(comm_mod.Comm, "all_to_all", "a2a issue"); wrap(comm_mod.Pending, "wait", "wait+finish"); wrap(ref, "_sum_returned", "sum")
    wrap(deep_ep.Buffer, "_agree", "agreement")
    tot = []
    for i in range(25):
        dist.barrier(); t = time.perf_counter(); buf.combine(recv_x, handle); tot.append(time.perf_counter() - t)
    out = {k: statistics.median(v[5:]) * 1e3 for k, v in T.items()}; out["total"] = statistics.median(tot[5:]) * 1e3
    res = [None] * R; dist.all_gather_object(res, out)
    if rank == 0:
        for k in out: print(f"{k:12s}", " ".join(f"{r[k]:7.2f}" for r in res))
    dist.destroy_process_group()
if __name__ == "__main__":
    R = int(sys.argv[1]); mp.spawn(run, args=(R, 512), nprocs=R)
