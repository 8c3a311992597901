"""Two-rank check of the nvshmem:// mailboxes.

    torchrun --nproc-per-node 2 tests/gpu/nvshmem_worker.py [default|pool]


1. credits: rank 0 sends 7 messages of odd sizes (0 .. R rows) through S = 2 slots before
   rank 1 receives any (the third send waits on the GPU for credit); rank 1 checks each and
   sends it back doubled on the combine channel; rank 0 checks the replies. Also a send to self.
2. CUDA graph: each rank captures its side of one dispatch+combine once and replays it 20
   times with new data and no host synchronisation in between.
The reply metas are rows of one [7, R+1] int64 tensor, so every other one starts 8 bytes off a
16-byte boundary: with alignment-specialised kernels that receive compiled (and loaded) a new
variant while rank 0's sends spun for credit, and both ranks hung. The argument picks the
stream the checks run on (the legacy default stream, or a pool stream).
Prints "PASS <name>" per check and exits non-zero on the first failure.
"""

from __future__ import annotations

import sys
import time

import torch
import torch.distributed as dist

from eaas.gpu import ChannelLayout, NvshmemPlane, init_rank

R, H, S = 64, 384, 2


def rows_for(i: int, n: int, device: str) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 + i)
    return torch.randn(max(n, 1), H, generator=g).to(torch.bfloat16).to(device)[:n]  # [n, H]


def meta_for(i: int, n: int, device: str) -> torch.Tensor:
    m = torch.zeros(R + 1, dtype=torch.int64)
    m[0] = n
    m[1:1 + n] = torch.arange(n) * 10 + i
    return m.to(device)


def main() -> int:
    info = init_rank()
    stream = sys.argv[1] if len(sys.argv) > 1 else "default"
    if stream == "default":
        checks(info.rank, info.device)
    else:
        with torch.cuda.stream(torch.cuda.Stream(device=info.device)):
            checks(info.rank, info.device)
    dist.destroy_process_group()
    return 0


def checks(rank: int, dev: str) -> None:
    lay = ChannelLayout(world_size=2, num_slots=S, max_rows=R, hidden=H, ctas_per_send=4)
    plane = NvshmemPlane.create(dist.group.WORLD, dev, {"dispatch": lay, "combine": lay})
    disp, comb = plane.channels["dispatch"], plane.channels["combine"]
    out = torch.empty(R, H, dtype=torch.bfloat16, device=dev)
    out_meta = torch.empty(R + 1, dtype=torch.int64, device=dev)
    sizes = [5, 0, R, 1, 33, R - 1, 17]
    x, m = rows_for(99, 9, dev).contiguous(), meta_for(99, 9, dev)

    # 1. credits + round trip
    if rank == 0:
        staged = [(rows_for(i, n, dev).contiguous(), meta_for(i, n, dev))
                  for i, n in enumerate(sizes)]
        backs = torch.empty(len(sizes), R, H, dtype=torch.bfloat16, device=dev)
        back_metas = torch.empty(len(sizes), R + 1, dtype=torch.int64, device=dev)
        ready = torch.cuda.Event()
        ready.record()  # staged rows and reply buffers exist; the sends come after this
        for rows, meta in staged:
            disp.send(1, rows, meta)
        # Replies are received on a stream of their own that waits only for `ready`, not for
        # the sends: a send past the S slots waits for credit, which needs rank 1 to get past
        # its own reply sends, which wait for OUR credit — i.e. for these receives to run.
        side = torch.cuda.Stream(device=dev)
        side.wait_event(ready)  # (both streams non-default)
        with torch.cuda.stream(side):
            for i in range(len(sizes)):
                comb.recv(1, backs[i], back_metas[i])
        torch.cuda.synchronize()
        for i, n in enumerate(sizes):
            assert int(back_metas[i, 0]) == n, (i, int(back_metas[i, 0]), n)
            assert torch.equal(backs[i, :n], staged[i][0] * 2), f"reply {i} rows differ"
            assert torch.equal(back_metas[i, 1:1 + n], staged[i][1][1:1 + n]), f"reply {i} tags"
    else:
        time.sleep(0.3)  # let rank 0's sends run ahead: its third one must wait for credit
        replies = []
        for i, n in enumerate(sizes):
            disp.recv(0, out, out_meta)
            torch.cuda.synchronize()
            assert int(out_meta[0]) == n and torch.equal(out[:n], rows_for(i, n, dev)), i
            reply = (out * 2).contiguous()
            replies.append((reply, out_meta.clone()))
            comb.send(0, reply, replies[-1][1])
        torch.cuda.synchronize()
    # send to self again, after the credit traffic
    disp.send(rank, x, m)
    disp.recv(rank, out, out_meta)
    torch.cuda.synchronize()
    assert torch.equal(out[:9], x) and int(out_meta[0]) == 9
    dist.barrier()
    print(f"[rank{rank}] PASS credits_round_trip_and_self_send", flush=True)

    # 2. CUDA graph: capture once, replay 20 times
    stage = torch.zeros(R, H, dtype=torch.bfloat16, device=dev)
    stage_meta = meta_for(0, 48, dev)
    back = torch.empty(R, H, dtype=torch.bfloat16, device=dev)
    graph = torch.cuda.CUDAGraph()
    torch.cuda.synchronize()
    dist.barrier()
    with torch.cuda.graph(graph):
        if rank == 0:
            disp.send(1, stage, stage_meta)
            comb.recv(1, out, out_meta)
        else:
            disp.recv(0, out, out_meta)
            torch.mul(out, 2, out=back)
            comb.send(0, back, out_meta)
    torch.cuda.synchronize()
    dist.barrier()
    for it in range(20):
        if rank == 0:
            stage.copy_(rows_for(it, R, dev))
        graph.replay()
        if rank == 0:
            torch.cuda.synchronize()
            assert torch.equal(out[:48], stage[:48] * 2), f"graph replay {it}"
    torch.cuda.synchronize()
    dist.barrier()
    print(f"[rank{rank}] PASS cuda_graph_replay_20", flush=True)


if __name__ == "__main__":
    sys.exit(main())
