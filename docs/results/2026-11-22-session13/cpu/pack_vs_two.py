import os, time, statistics, torch, torch.distributed as dist, torch.multiprocessing as mp
def run(rank, R, N):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="29533")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=R)
    H=7168; S=H//128*4
    M=N*R  # rows sent per rank (all tokens to all ranks roughly)
    x=torch.randint(0,255,(M,H),dtype=torch.uint8); sc=torch.randint(0,255,(M,S),dtype=torch.uint8)
    rx=torch.empty_like(x); rs=torch.empty_like(sc)
    pk=torch.empty(M,H+S,dtype=torch.uint8); rpk=torch.empty_like(pk)
    splits=[N]*R
    res={"two":[], "one":[], "one+pack":[]}
    for it in range(40):
        for k in res:
            dist.barrier(); t=time.perf_counter()
            if k=="two":
                w1=dist.all_to_all_single(rx,x,splits,splits,async_op=True)
                w2=dist.all_to_all_single(rs,sc,splits,splits,async_op=True)
                w1.wait(); w2.wait()
            else:
                if k=="one+pack":
                    pk[:, :H].copy_(x); pk[:, H:].copy_(sc)
                dist.all_to_all_single(rpk,pk,splits,splits)
                if k=="one+pack":
                    rx.copy_(rpk[:, :H]); rs.copy_(rpk[:, H:])
            if it>=5: res[k].append(time.perf_counter()-t)
    med={k:statistics.median(v)*1e3 for k,v in res.items()}
    out=[None]*R; dist.all_gather_object(out, med)
    if rank==0:
        for k in med: print(N, k, " ".join(f"{o[k]:.3f}" for o in out))
    dist.destroy_process_group()
if __name__=="__main__":
    import sys
    R=int(sys.argv[1])
    for N in (128,512):
        mp.spawn(run, args=(R,N), nprocs=R)
