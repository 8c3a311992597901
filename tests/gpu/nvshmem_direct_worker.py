"""Two-rank check of the nvshmem:// direct path (put / gather through NVLink mappings).

    torchrun --nproc-per-node 2 tests/gpu/nvshmem_direct_worker.py [NVSHMEM|CUDA] [timeouts]

The first argument picks torch's symmetric-memory backend of the mailboxes: NVSHMEM's heap
(nvshmem://, the default) or CUDA IPC mappings (cudaipc://); the kernels are the same.
`timeouts` runs check 5 alone.

Every rank can build every rank's inputs (seeded by rank and round), so each checks its own
gathers against `eaas.gpu.credits.exchange_reference` bit for bit.

1. rounds: 6 rounds of put + gather with group sizes 0 .. R (cut to R past it) and tags.
2. credits: 7 puts in a row on one stream while the gathers run on another: the third put to
   each rank waits on the GPU for that rank's credit (S = 2).
3. graph: dispatch put + gather, then combine put (the gathered rows, doubled) + gather, captured
   once and replayed 20 times with new inputs, no host sync in between.
4. view: wait_all / release_all (zero copy) for 3 rounds.
5. timeouts (timeout_s = 0.5): rank 0 stops rank 1 (SIGSTOP), then gathers (nothing from rank 1:
   n = 0) and puts until rank 1's two slots are full; the gather and the last put return after
   timeout_s to 2 * timeout_s with their failure words set (wall times printed). Rank 1 resumes
   (SIGCONT), takes what it missed, and a round of both after that is in step. Every gather is
   checked against `eaas.gpu.credits.ExchangeModel`, which both ranks run through the same story.
Prints "PASS <name>" per check; exits non-zero on the first failure.
"""

from __future__ import annotations

import os
import signal
import sys
import time

import torch
import torch.distributed as dist

from eaas.gpu import ChannelLayout, NvshmemPlane, init_rank
from eaas.gpu.credits import ExchangeModel, exchange_reference

R, H, S, W = 64, 512, 2, 2


def puts_of(rank: int, rnd: int, device: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rank `rank`'s input of round `rnd`: rows [N, H] grouped by destination, offsets, tags."""
    g = torch.Generator().manual_seed(7919 * rnd + rank)
    sizes = torch.randint(0, R + 1, (W,), generator=g)
    if rnd % 3 == 1:
        sizes[rnd % W] = 0  # an empty message
    if rnd % 3 == 2:
        sizes[(rnd + 1) % W] = R  # a full one
    offsets = torch.zeros(W + 1, dtype=torch.int64)
    offsets[1:] = sizes.cumsum(0)
    n = int(offsets[-1])
    rows = torch.randn(max(n, 1), H, generator=g).to(torch.bfloat16)[:n].contiguous()
    tags = torch.randint(0, 1 << 40, (n,), generator=g)
    return rows.to(device), offsets.to(device), tags.to(device)


def expect(rank: int, rnd: int) -> tuple[torch.Tensor, torch.Tensor]:
    return exchange_reference([puts_of(s, rnd, "cpu") for s in range(W)], R)[rank]


def check(out: torch.Tensor, meta: torch.Tensor, want: tuple[torch.Tensor, torch.Tensor],
          what: str) -> None:
    w_out, w_meta = want
    for s in range(W):
        n = int(w_meta[s, 0])
        assert int(meta[s, 0]) == n, f"{what}: from rank {s} n={int(meta[s, 0])} want {n}"
        assert torch.equal(meta[s, :1 + n].cpu(), w_meta[s, :1 + n]), f"{what}: tags from {s}"
        assert torch.equal(out[s, :n].cpu(), w_out[s, :n]), f"{what}: rows from {s}"


def timeouts(rank: int, dev: str, backend: str) -> None:
    """Check 5 (see the module docstring)."""
    timeout = 0.5
    lay = ChannelLayout(world_size=W, num_slots=S, max_rows=R, hidden=H, ctas_per_send=8)
    plane = NvshmemPlane.create(dist.group.WORLD, dev, {"dispatch": lay}, backend=backend,
                                timeout_s=timeout)
    ch = plane.channels["dispatch"]
    assert ch.delta is not None, "no NVLink mapping between the two GPUs"
    model = ExchangeModel.for_layout(lay)
    out = torch.empty(W, R, H, dtype=torch.bfloat16, device=dev)
    meta = torch.empty(W, R + 1, dtype=torch.int64, device=dev)
    pids = [0] * W
    dist.all_gather_object(pids, os.getpid())

    def step(actor: int, rnd: int | None = None) -> float:
        """One op of the story: with `rnd`, rank `actor` puts its round-rnd rows, else it
        gathers. Every rank runs it on the model (so all know what comes next), only `actor` on
        the channel, checking gathers and failure words. Returns the op's wall time there."""
        if rnd is not None:
            model.put(actor, *puts_of(actor, rnd, "cpu"))
        else:
            want = model.gather(actor)
        if rank != actor:
            return 0.0
        args = puts_of(actor, rnd, dev) if rnd is not None else ()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        if rnd is not None:
            ch.put(*args)
        else:
            ch.gather(out, meta)
        torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        if rnd is None:
            check(out, meta, want, f"gather of rank {actor}")
        fails = ch.failures().tolist()
        assert fails == model.failures(actor).tolist(), f"rank {actor} failures {fails}"
        return dt

    if rank == 0:
        os.kill(pids[1], signal.SIGSTOP)
    try:  # rank 1 is stopped: nothing comes from it, and it hands no slot back
        step(0, 0)
        t_gather = step(0)  # from rank 1: n = 0
        step(0, 1)  # rank 1's second slot
        t_put = step(0, 2)  # to rank 1: no free slot
    finally:
        if rank == 0:
            os.kill(pids[1], signal.SIGCONT)
    if rank == 0:
        for what, dt in (("gather", t_gather), ("put", t_put)):
            print(f"[rank0] {what} with rank 1 stopped returned after {dt:.3f} s "
                  f"(timeout_s {timeout})", flush=True)
            assert 0.9 * timeout <= dt < 2 * timeout, f"{what} took {dt:.3f} s"
        assert ch.failures().tolist() == [[0, 1], [0, 1]], ch.failures().tolist()
        ch.clear_failures()
    model.clear_failures(0)
    dist.barrier()
    step(1, 0)  # rank 1 is back: it sends two rounds and takes rank 0's two messages
    step(1, 1)
    step(1)
    step(1)
    dist.barrier()
    step(0)  # rank 0 takes its own two and rank 1's two
    step(0)
    dist.barrier()
    step(0, 3)  # in step again: one round of both is what fresh counters give
    step(1, 2)
    dist.barrier()
    step(0)
    step(1)
    check(out, meta, exchange_reference([puts_of(0, 3, "cpu"), puts_of(1, 2, "cpu")], R)[rank],
          "round after the recovery")
    assert not ch.failures().any()
    dist.barrier()
    print(f"[rank{rank}] PASS timeouts", flush=True)


def main() -> int:
    info = init_rank()
    rank, dev = info.rank, info.device
    lay = ChannelLayout(world_size=W, num_slots=S, max_rows=R, hidden=H, ctas_per_send=8)
    backend = sys.argv[1] if len(sys.argv) > 1 else "NVSHMEM"
    if sys.argv[2:] == ["timeouts"]:
        timeouts(rank, dev, backend)
        torch.cuda.synchronize()
        sys.stdout.flush()
        os._exit(0)
    plane = NvshmemPlane.create(dist.group.WORLD, dev, {"dispatch": lay, "combine": lay},
                                backend=backend)
    disp, comb = plane.channels["dispatch"], plane.channels["combine"]
    assert disp.delta is not None, "no NVLink mapping between the two GPUs"
    out = torch.empty(W, R, H, dtype=torch.bfloat16, device=dev)
    meta = torch.empty(W, R + 1, dtype=torch.int64, device=dev)

    for rnd in range(6):  # 1. rounds
        disp.put(*puts_of(rank, rnd, dev))
        disp.gather(out, meta)
        torch.cuda.synchronize()
        check(out, meta, expect(rank, rnd), f"round {rnd}")
    dist.barrier()
    print(f"[rank{rank}] PASS rounds", flush=True)

    # 2. credits: 7 puts queued on the main stream, gathers on a side stream
    staged = [puts_of(rank, 100 + i, dev) for i in range(7)]
    outs = torch.empty(7, W, R, H, dtype=torch.bfloat16, device=dev)
    metas = torch.empty(7, W, R + 1, dtype=torch.int64, device=dev)
    ready = torch.cuda.Event()
    ready.record()
    side = torch.cuda.Stream(device=dev)
    side.wait_event(ready)
    for p in staged:
        disp.put(*p)
    with torch.cuda.stream(side):
        for i in range(7):
            disp.gather(outs[i], metas[i])
    torch.cuda.synchronize()
    for i in range(7):
        check(outs[i], metas[i], expect(rank, 100 + i), f"credit message {i}")
    dist.barrier()
    print(f"[rank{rank}] PASS credits", flush=True)

    # 3. graph: static inputs, captured once
    x = torch.empty(W * R, H, dtype=torch.bfloat16, device=dev)
    off = torch.empty(W + 1, dtype=torch.int64, device=dev)
    tags = torch.empty(W * R, dtype=torch.int64, device=dev)
    mid = torch.empty(W, R, H, dtype=torch.bfloat16, device=dev)
    mid_meta = torch.empty(W, R + 1, dtype=torch.int64, device=dev)
    starts = torch.arange(W, dtype=torch.int64, device=dev) * R  # where each source's rows are
    doubled = torch.empty(W * R, H, dtype=torch.bfloat16, device=dev)

    def load(rnd: int) -> None:
        r_x, r_off, r_tags = puts_of(rank, rnd, dev)
        x[:r_x.shape[0]].copy_(r_x)
        off.copy_(r_off)
        tags[:r_tags.shape[0]].copy_(r_tags)

    def pair() -> None:
        disp.put(x, off, tags)
        disp.gather(mid, mid_meta)
        torch.mul(mid.view(W * R, H), 2, out=doubled)
        comb.put_spans(doubled, starts, mid_meta[:, 0], mid_meta[:, 1:].reshape(-1))
        comb.gather(out, meta)

    load(300)
    pair()  # warm-up (compile) outside the capture
    torch.cuda.synchronize()
    dist.barrier()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        pair()
    torch.cuda.synchronize()
    dist.barrier()
    for it in range(20):
        load(400 + it)
        graph.replay()
        torch.cuda.synchronize()
        # the combine brings back, from each rank d, my n rows for d, doubled, with my tags
        r_x, r_off, r_tags = puts_of(rank, 400 + it, "cpu")
        for d in range(W):
            a, b = int(r_off[d]), int(r_off[d + 1])
            n = min(b - a, R)
            assert int(meta[d, 0]) == n, f"replay {it}: {int(meta[d, 0])} rows back from {d}"
            assert torch.equal(out[d, :n].cpu(), r_x[a:a + n] * 2), f"replay {it}: rows from {d}"
            assert torch.equal(meta[d, 1:1 + n].cpu(), r_tags[a:a + n]), f"replay {it}: tags {d}"
        dist.barrier()
    print(f"[rank{rank}] PASS graph_replay_20", flush=True)

    disp.sync_counters()  # the replays advanced the device counters behind the host mirror
    for rnd in range(3):  # 4. zero-copy view
        disp.put(*puts_of(rank, 500 + rnd, dev))
        views, view_metas = disp.wait_all()
        got = torch.stack([v.clone() for v in views])
        got_meta = torch.stack([m.clone() for m in view_metas])
        disp.release_all()
        torch.cuda.synchronize()
        check(got, got_meta, expect(rank, 500 + rnd), f"view round {rnd}")
    dist.barrier()
    print(f"[rank{rank}] PASS view", flush=True)
    torch.cuda.synchronize()
    sys.stdout.flush()
    os._exit(0)  # NVSHMEM's finalize at exit is collective and not needed here


if __name__ == "__main__":
    sys.exit(main())
