import sys, time, statistics, torch
sys.path.insert(0, sys.argv[1])
from deep_ep.backends.reference import _sum_returned
from deep_ep.routing import Route
torch.set_num_threads(1)
g=torch.Generator().manual_seed(0)
N,H,E,K=512,7168,256,8
for R in (2,4):
    scores=torch.rand(N,E,generator=g)
    idx=scores.topk(K,dim=1).indices
    in_rank=torch.zeros(N,R,dtype=torch.bool)
    in_rank.scatter_(1, idx//(E//R), True)
    counts=torch.zeros(R,R,dtype=torch.long); counts[0]=in_rank.sum(0)
    route=Route.exact(in_rank,counts,0)
    rows=torch.randn(route.send_tokens.shape[0]+1,H,generator=g).bfloat16(); rows[-1]=0
    out=torch.empty(N,H,dtype=torch.bfloat16)
    ts=[]
    for i in range(40):
        t=time.perf_counter(); _sum_returned(route, rows, (), out); ts.append(time.perf_counter()-t)
    print(sys.argv[1], f"R={R} sum {min(ts[3:])*1e3:.3f} ms")
