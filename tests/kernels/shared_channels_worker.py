"""Ranks of test_shared_channels as child processes, over `eaas.gpu.shared_channels`.

`Ranks(target, world, *args)` (the test side, also used by tests/gpu) spawns one process per
rank with multiprocessing's 'spawn' context, `target(rank, pipe, *args)`. The `*_main` entry
points here first turn Triton's interpreter on, THEN import triton and the kernel modules
(nothing at this module's top imports them, so the test process may import it freely; the GPU
test's worker reuses the helpers without the interpreter). A child talks to the test over its
pipe: it sends its `export()`, receives every rank's (the test relays them: the control
plane), later sends `pickle.dumps(result)` (by value: torch's multiprocessing reductions would
share tensors through file descriptors that die with the child), and its counters when asked.

Echo channels: "ping" (rank 0 puts rows for rank 1) and "pong" (rank 1 puts back what it
gathered, from where it landed, as ServerExchange does); every rank puts and gathers once per
round on each channel (the direct path's lockstep), empty messages where it has nothing.
"""

from __future__ import annotations

import glob
import multiprocessing as mp
import os
import pickle
import time
from typing import Any

DEADLINE = 20.0  # seconds a child may take for any one answer (the CPU tests take far less)


class Ranks:
    """Spawned ranks, one pipe each; relays the exports; kills leftovers and their files."""

    def __init__(self, target: Any, world: int, *args: Any, deadline: float = DEADLINE) -> None:
        ctx = mp.get_context("spawn")
        self.deadline, self.pipes, self.procs = deadline, [], []
        for rank in range(world):
            here, there = ctx.Pipe()
            proc = ctx.Process(target=target, args=(rank, there, *args), daemon=True)
            proc.start()
            there.close()
            self.pipes.append(here)
            self.procs.append(proc)

    def __enter__(self) -> Ranks:
        try:
            exports = [self.recv(r, raw=True) for r in range(len(self.procs))]
            for pipe in self.pipes:
                pipe.send(exports)
        except BaseException:
            self.__exit__()
            raise
        return self

    def recv(self, rank: int, raw: bool = False) -> Any:
        pipe, proc = self.pipes[rank], self.procs[rank]
        end = time.monotonic() + self.deadline
        while not pipe.poll(0.05):
            if not proc.is_alive() and not pipe.poll(0):
                raise AssertionError(f"rank {rank} exited with {proc.exitcode} before answering")
            if time.monotonic() > end:
                raise AssertionError(f"rank {rank} gave no answer within {self.deadline} s")
        got = pipe.recv()
        return got if raw else pickle.loads(got)

    def send(self, rank: int, msg: Any) -> None:
        self.pipes[rank].send(msg)

    def counters(self) -> list[dict[str, Any]]:
        """Every rank's channel counters, asked for once all of them have answered."""
        for pipe in self.pipes:
            pipe.send("counters")
        return [self.recv(r) for r in range(len(self.pipes))]

    def join(self, rank: int) -> int | None:
        self.procs[rank].join(self.deadline)
        return self.procs[rank].exitcode

    def __exit__(self, *exc: Any) -> None:
        for proc in self.procs:
            if proc.is_alive():
                proc.kill()  # a child of this test (by its handle)
            proc.join(5)
            for path in glob.glob(f"/dev/shm/eaas-channels-{proc.pid}-*"):
                os.unlink(path)  # a rank that died before unlinking its arena's name


R, H, S = 4, 16, 2
ECHO_SIZES = (3, 0, 4, 1, 6, 2)  # rows rank 0 sends per round (6 > R: cut to R)


def _interpreter() -> None:
    os.environ["TRITON_INTERPRET"] = "1"  # before anything imports triton


def echo_layouts() -> dict[str, Any]:
    from eaas.gpu.credits import ChannelLayout

    lay = ChannelLayout(world_size=2, num_slots=S, max_rows=R, hidden=H, dtype="bfloat16",
                        ctas_per_send=2)
    return {"ping": lay, "pong": lay}


def echo_input(rnd: int) -> tuple[Any, Any, Any]:
    """Rank 0's ping of round `rnd`: rows [n, H] bf16, offsets [0, 0, n] (none to itself), tags."""
    import torch

    g = torch.Generator().manual_seed(31 + rnd)
    n = ECHO_SIZES[rnd % len(ECHO_SIZES)]
    rows = torch.randn(n, H, generator=g).to(torch.bfloat16)
    return rows, torch.tensor([0, 0, n]), 1000 * rnd + torch.arange(n)


def empty_put(w: int) -> tuple[Any, Any, None]:
    """A put of nothing to anyone (rows [0, H] bf16, offsets [W + 1] zeros, no tags)."""
    import torch

    return torch.zeros(0, H, dtype=torch.bfloat16), torch.zeros(w + 1, dtype=torch.long), None


def echo_reference(rnd: int) -> dict[str, list[tuple[Any, Any]]]:
    """Both ranks' gathers of one echo round (exchange_reference): ping as rank 0 put it, pong
    as rank 1 echoed it."""
    import torch

    from eaas.gpu.credits import exchange_reference

    ping = exchange_reference([echo_input(rnd), empty_put(2)], R)
    got, meta = ping[1]
    n = meta[:, 0].tolist()
    rows = torch.cat([got[s, :n[s]] for s in range(2)])
    tags = torch.cat([meta[s, 1:1 + n[s]] for s in range(2)])
    offsets = torch.tensor([0, n[0], n[0] + n[1]])
    return {"ping": ping, "pong": exchange_reference([empty_put(2), (rows, offsets, tags)], R)}


def connect_rank(conn: Any, layouts: dict[str, Any], rank: int, timeout_s: float | None,
                 device: str = "cpu") -> tuple[Any, dict[str, Any]]:
    """Allocate this rank's set, trade exports with the test, connect: (set, channels)."""
    from eaas.gpu.shared_channels import SharedChannels

    mine = SharedChannels.allocate(layouts, rank, device)
    conn.send(mine.export())
    channels = mine.connect(conn.recv(), timeout_s)
    return mine, channels


def echo_round(rank: int, ping: Any, pong: Any, rnd: int) -> dict[str, Any]:
    """One round of both channels on `rank`; returns what its two gathers left."""
    import torch

    dev, i64, w = ping.recv_buf.device, torch.int64, 2
    blank, none = torch.zeros(1, H, dtype=torch.bfloat16, device=dev), torch.zeros(w, dtype=i64,
                                                                                   device=dev)
    out = {}
    if rank == 0:
        rows, offsets, tags = (t.to(dev) for t in echo_input(rnd))
        ping.put(rows, offsets, tags)
    else:
        ping.put(blank[:0], torch.zeros(w + 1, dtype=i64, device=dev))
    got = torch.zeros(w, R, H, dtype=torch.bfloat16, device=dev)
    meta = torch.zeros(w, R + 1, dtype=i64, device=dev)
    ping.gather(got, meta, 2)
    out["ping"] = (got, meta)
    if rank == 1:  # echo each source's rows back to it, from where they landed
        pong.put_spans(got.view(w * R, H), torch.arange(w, dtype=i64, device=dev) * R,
                       meta[:, 0], meta[:, 1:].reshape(-1))
    else:
        pong.put_spans(blank, none, none)
    back = torch.zeros(w, R, H, dtype=torch.bfloat16, device=dev)
    back_meta = torch.zeros(w, R + 1, dtype=i64, device=dev)
    pong.gather(back, back_meta, 2)
    out["pong"] = (back, back_meta)
    return out


def counters(channels: dict[str, Any]) -> dict[str, Any]:
    return {name: {"sent": ch.sent.tolist(), "recvd": ch.recvd.tolist(),
                   "credit": ch.credit.tolist(), "failures": ch.failures().tolist(),
                   "cut": ch.rows_cut()} for name, ch in channels.items()}


def report_counters(conn: Any, channels: dict[str, Any]) -> None:
    """Once every rank finished (the test says so): this rank's counters. Not before: a peer's
    last gather may still be writing its credit into this rank's words."""
    assert conn.recv() == "counters"
    conn.send(pickle.dumps(counters(channels)))


def echo_main(rank: int, conn: Any, rounds: int, timeout_s: float) -> None:
    """`rounds` echo rounds after a warm-up (4 rounds of every kernel variant)."""
    _interpreter()
    mine, channels = connect_rank(conn, echo_layouts(), rank, timeout_s)
    mine.warm_up(timeout_s)
    mine.unlink()  # every peer has mapped this rank: it put to it during the warm-up
    t0 = time.perf_counter()
    results = [echo_round(rank, channels["ping"], channels["pong"], rnd) for rnd in range(rounds)]
    seconds = time.perf_counter() - t0
    conn.send(pickle.dumps({"rounds": results, "seconds": seconds}))
    report_counters(conn, channels)


def dead_peer_main(rank: int, conn: Any, timeout_s: float) -> None:
    """Round 0 on both ranks; then rank 1 exits without a word. Once the test saw it gone it
    tells rank 0 to go on: a ping round (its gather times out on rank 1), then pings until
    rank 1's slots are full (the last put times out on credit)."""
    _interpreter()
    import torch

    mine, channels = connect_rank(conn, echo_layouts(), rank, timeout_s)
    ping, pong = channels["ping"], channels["pong"]
    first = echo_round(rank, ping, pong, 0)
    if rank == 1:
        os._exit(0)  # dies: no unlink, no goodbye (its file stays for the test to remove)
    mine.unlink()
    conn.send(pickle.dumps({"first": first}))
    assert conn.recv() == "go"
    rows, offsets, tags = echo_input(1)
    t0 = time.perf_counter()
    ping.put(rows, offsets, tags)  # rank 1 took round 0's ping: slot free
    got = torch.zeros(2, R, H, dtype=torch.bfloat16)
    meta = torch.zeros(2, R + 1, dtype=torch.int64)
    ping.gather(got, meta, 2)
    gather_s = time.perf_counter() - t0
    after_gather = ping.failures().clone()
    ping.put(rows, offsets, tags)  # message 2 -> slot 0 (rank 1 consumed message 0)
    t1 = time.perf_counter()
    ping.put(rows, offsets, tags)  # message 3 -> slot 1, still holding message 1: no credit
    put_s = time.perf_counter() - t1
    conn.send(pickle.dumps({"gather_s": gather_s, "put_s": put_s, "meta": meta,
                            "after_gather": after_gather.tolist(),
                            "failures": ping.failures().tolist(), "sent": ping.sent.tolist()}))


def moe_setup(device: str = "cpu") -> tuple[Any, Any, Any]:
    """One shard (rank 0) and one server (rank 1) hosting every expert of two MoE layers
    (test_device_experts' sizes, float32): (format, placements, layer -> (w13, w2))."""
    import torch

    from eaas.engine.device_experts import ExchangeFormat, ExpertPlacement
    from tests.kernels.conftest import moe_weights
    from tests.kernels.test_device_experts import E, H, K

    g = torch.Generator().manual_seed(5)
    fmt = ExchangeFormat((0,), (1,), max_rows=8, hidden=H, top_k=K, dtype="float32",
                         num_slots=2, ctas_per_send=2, gather_ctas=2)
    placements = {l: ExpertPlacement.build(E, {e: (0, e) for e in range(E)}, device)
                  for l in (0, 1)}
    experts = {l: moe_weights(E, H, 8, torch.float32, g, device) for l in (0, 1)}
    return fmt, placements, experts


def moe_input(step: int, layer: int, sizes: tuple[int, ...], device: str = "cpu"
              ) -> tuple[Any, Any, Any]:
    """The shard's (x, topk_ids, topk_weights) of one step's layer."""
    import torch

    from tests.kernels.test_device_experts import routing

    return routing(sizes[(2 * step + layer) % len(sizes)], 10 * step + layer, torch.float32,
                   device)


def moe_main(rank: int, conn: Any, steps: int, sizes: tuple[int, ...], timeout_s: float) -> None:
    """`moe_setup`'s ranks: rank 0 the shard (ShardExchange, every step's layers 0 and 1),
    rank 1 the server (ServerExchange driven by ServerLoop, told the number of steps by one
    message from the test)."""
    _interpreter()
    import asyncio

    from eaas.engine.device_experts import (PAIRS, RESULTS, ROWS, ExchangeChannels,
                                            ServerExchange, ShardExchange)
    from eaas.engine.server_loop import ServerLoop

    fmt, placements, experts = moe_setup()
    mine, ch = connect_rank(conn, fmt.layouts(), rank, timeout_s)
    channels = ExchangeChannels(ch[ROWS], ch[PAIRS], ch[RESULTS])
    t0 = time.perf_counter()
    if rank in fmt.shard_ranks:
        shard = ShardExchange(fmt, channels, placements)
        outs = []
        for step in range(steps):
            for layer in (0, 1):
                shard.send(layer, *moe_input(step, layer, sizes))
                outs.append(shard.receive())
        result = {"outs": outs, "overflow": int(shard.overflow)}
        failures = shard.failures()
    else:
        loop = ServerLoop(ServerExchange(fmt, channels, experts), [0, 1], ahead=2)
        k = conn.recv()  # the shard's "run k steps" (one message for the batch)

        async def serve() -> None:
            loop.start(1)  # a first step enqueued at once (on CUDA: before capture())
            await loop.drain()
            await loop.run(k - 1)

        asyncio.run(serve())
        result = {"steps_done": loop.steps_done, "steps_enqueued": loop.steps_enqueued}
        failures = loop.failures()
    mine.unlink()
    result.update(seconds=time.perf_counter() - t0, failures=failures.tolist())
    conn.send(pickle.dumps(result))
    report_counters(conn, ch)


def exchange_counts(rank: int, name: str, messages: int, base: int = 0) -> dict[str, list[int]]:
    """The counters of a two-rank MoE exchange (rank 0 the shard, 1 the server) after
    `messages` rounds, plus `base` messages each way of every channel (a warm-up): the shard
    puts moe_rows / moe_pairs and takes moe_results, the server the reverse."""
    sends = (name != "moe_results") == (rank == 0)
    peer = [0, 0]
    peer[1 - rank] = messages
    none = [0, 0]
    plus = [base + n for n in peer], [base + n for n in none]
    return {"sent": plus[0] if sends else plus[1], "credit": plus[0] if sends else plus[1],
            "recvd": plus[1] if sends else plus[0]}
