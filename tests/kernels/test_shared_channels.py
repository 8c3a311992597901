"""Direct-path channels between REAL processes (eaas.gpu.shared_channels) and the server loop.

Here, not in tests/gpu: on a CPU machine the channels' kernels run in Triton's interpreter,
whose loads, stores and atomics go straight to the ranks' /dev/shm mappings, so two or three
spawned processes (tests/kernels/shared_channels_worker.py, which turns the interpreter on
before importing triton) exchange rows exactly as GPU processes would over CUDA IPC mappings.
The test process only relays the ranks' exports (the control plane) and checks results;
every wait of the children is bounded (timeout_s), and the test kills what is left.
The in-process tests check the description, the deltas, the argument errors and the server
loop's host side; those that launch kernels run in the interpreter only (on a CUDA machine
tests/gpu/test_shared_channels_cuda.py runs the processes on the GPU).
"""

from __future__ import annotations

import asyncio
import os
import pickle
from types import SimpleNamespace
from typing import Any

import msgpack
import pytest
import torch

from eaas.engine.device_experts import ExchangeChannels, ServerExchange
from eaas.engine.row_layout import moe_per_pair_ref
from eaas.engine.server_loop import ServerLoop
from eaas.gpu.credits import ChannelLayout, exchange_reference
from eaas.gpu.shared_channels import ALIGN, SharedChannel, SharedChannels, arena_plan
from eaas_kernels.reference import expert_rows_ref

from . import shared_channels_worker as worker
from .conftest import interpreter_only
from .shared_channels_worker import Ranks
from .test_device_experts import EXACT, Cluster

@interpreter_only
@pytest.mark.slow
def test_two_processes_echo_rows_through_every_slot() -> None:
    """Rank 0 puts, rank 1 gathers and puts the rows back: 6 rounds after the 4 warm-up rounds
    (S = 2: every slot reused, credits come back across processes), group sizes 0..R and one
    cut to R; every gather of both ranks equals exchange_reference bit for bit (bf16 rows, tags,
    counts). About 6 s on 2 cores (two interpreters starting)."""
    rounds = 6
    with Ranks(worker.echo_main, 2, rounds, 10.0) as ranks:
        results = [ranks.recv(r) for r in (0, 1)]
        counters = ranks.counters()
        assert [ranks.join(r) for r in (0, 1)] == [0, 0]
    for rnd in range(rounds):
        want = worker.echo_reference(rnd)
        for rank, res in enumerate(results):
            for name in ("ping", "pong"):
                got, meta = res["rounds"][rnd][name]
                ref_rows, ref_meta = want[name][rank]
                assert torch.equal(meta, ref_meta), (rnd, rank, name, meta, ref_meta)
                assert torch.equal(got, ref_rows), (rnd, rank, name)
        back, _ = results[0]["rounds"][rnd]["pong"]
        rows = worker.echo_input(rnd)[0][:worker.R]
        assert torch.equal(back[1, :rows.shape[0]], rows)  # rank 0 got its own rows back
    total = [4 + rounds] * 2
    for rank, mine in enumerate(counters):
        for name, c in mine.items():
            assert c["sent"] == c["recvd"] == c["credit"] == total, (rank, name, c)
            assert c["failures"] == [[0, 0], [0, 0]], (rank, name)
            cut = 6 - worker.R if (rank, name) == (0, "ping") else 0
            assert c["cut"] == [0, cut], (rank, name, c["cut"])
    print(f"{rounds} echo rounds: {results[0]['seconds']:.2f} s in the interpreter")


@interpreter_only
@pytest.mark.slow
def test_a_peer_that_dies_makes_waits_time_out_not_hang() -> None:
    """Rank 1 does one round and dies (os._exit, its file left behind). Rank 0's next gather
    gives up after timeout_s (polls, in the interpreter) with n = 0 from rank 1 and its failure
    word set; its puts then fill rank 1's two slots, and the put that finds no credit gives up
    too. Rank 0 exits normally: nothing hangs."""
    timeout = 0.5
    with Ranks(worker.dead_peer_main, 2, timeout) as ranks:
        first = ranks.recv(0)["first"]
        assert ranks.join(1) == 0 and not ranks.procs[1].is_alive()
        ranks.send(0, "go")
        res = ranks.recv(0)
        assert ranks.join(0) == 0
    want = worker.echo_reference(0)
    for name in ("ping", "pong"):
        assert torch.equal(first[name][1], want[name][0][1])
    assert res["after_gather"] == [[0, 0], [0, 1]]  # the gather from rank 1 timed out
    assert res["meta"][:, 0].tolist() == [0, 0]  # n = 0 from rank 1 (and none sent to self)
    assert res["failures"] == [[0, 1], [0, 1]]  # and the put into its full slots
    assert res["sent"] == [4, 3]  # the put that timed out sent nothing to rank 1
    for what in ("gather_s", "put_s"):
        assert 0.05 < res[what] < 10 * timeout, (what, res[what])
    print(f"dead peer: gather gave up after {res['gather_s']:.2f} s, put after "
          f"{res['put_s']:.2f} s (timeout_s {timeout}, counted in polls here)")


@interpreter_only
@pytest.mark.slow
def test_moe_steps_between_a_shard_process_and_a_server_process() -> None:
    """The shard (ShardExchange) runs 3 steps of MoE layers 0 and 1 (T = 0 once); the server
    runs ServerExchange under ServerLoop, told "run 3 steps" by one message. Every output
    equals moe_per_pair_ref; each channel counts 6 messages one way (shard to server for
    rows and pairs, back for results), no failures. About 8 s on 2 cores."""
    steps, sizes = 3, (5, 8, 0, 3, 7, 6)
    with Ranks(worker.moe_main, 2, steps, sizes, 10.0) as ranks:
        ranks.send(1, steps)
        results = [ranks.recv(r) for r in (0, 1)]
        counters = ranks.counters()
        assert [ranks.join(r) for r in (0, 1)] == [0, 0]
    _, _, experts = worker.moe_setup()
    outs = results[0]["outs"]
    for step in range(steps):
        for layer in (0, 1):
            x, ids, w = worker.moe_input(step, layer, sizes)
            out = outs[2 * step + layer]
            assert out.shape == x.shape and out.dtype == x.dtype
            w13, w2 = experts[layer]
            want = moe_per_pair_ref(x, ids, w, lambda r, e: expert_rows_ref(r, e, w13, w2))
            torch.testing.assert_close(out, want, **EXACT[torch.float32])
    assert results[0]["overflow"] == 0
    for rank, res in enumerate(results):
        assert res["failures"] == [[0, 0], [0, 0]], rank
        for name, c in counters[rank].items():
            want = worker.exchange_counts(rank, name, 2 * steps)
            assert {k: c[k] for k in want} == want, (rank, name)
    assert results[1]["steps_done"] == results[1]["steps_enqueued"] == steps
    print("MoE steps: " + ", ".join(f"rank {r} {res['seconds']:.2f} s"
                                    for r, res in enumerate(results)))


# -- in one process: descriptions, deltas, errors --

def _lay(**kw: Any) -> ChannelLayout:
    return ChannelLayout(**{"world_size": 2, "num_slots": 2, "max_rows": 4, "hidden": 16,
                            "dtype": "bfloat16", "ctas_per_send": 2} | kw)


@pytest.fixture
def pair() -> Any:
    sets = [SharedChannels.allocate({"a": _lay(), "b": _lay(dtype="float32", hidden=8)}, r)
            for r in (0, 1)]
    yield sets
    for s in sets:
        s.close()


@interpreter_only
def test_two_ranks_in_one_process_map_each_other_and_exchange(pair) -> None:
    """Each rank maps the other's file (a second mapping of it, in this process); deltas are
    the address differences here; one round of put + gather matches exchange_reference; the
    descriptions survive pickle and msgpack; unlink leaves the mappings valid."""
    exports = [pickle.loads(pickle.dumps(pair[0].export())),
               msgpack.unpackb(msgpack.packb(pair[1].export()))]
    chans = [s.connect(exports[::-1], timeout_s=1.0) for s in pair]
    for s in pair:
        s.unlink()
    assert not any(os.path.exists(e["handle"]) for e in exports)
    plan, nbytes = arena_plan(pair[0].layouts)
    assert nbytes % ALIGN == 0 and all(b.offset % ALIGN == 0 for bufs in plan.values()
                                       for b in bufs)
    for me, c in enumerate(chans):
        for name, ch in c.items():
            assert isinstance(ch, SharedChannel) and ch.nvshmem is False and ch.timeout_s == 1.0
            assert len(ch.mappings) == 1
            peer = ch.mappings[0].data_ptr()
            for k, buf in enumerate((ch.recv_buf, ch.meta, ch.sig, ch.credit)):
                off = buf.data_ptr() - pair[me].arena.data_ptr()
                want = (peer + off - buf.data_ptr()) // buf.element_size()
                assert ch.delta[k].tolist() == ([0, want] if me == 0 else [want, 0])
    a0, a1 = chans[0]["a"], chans[1]["a"]
    rows, offsets, tags = torch.randn(5, 16).bfloat16(), torch.tensor([0, 2, 5]), torch.arange(5)
    a0.put(rows, offsets, tags)
    a1.put(rows[:0], torch.zeros(3, dtype=torch.long))
    want = exchange_reference([(rows, offsets, tags), worker.empty_put(2)], 4)
    for ch, (ref_rows, ref_meta) in zip((a0, a1), want):
        got = torch.zeros(2, 4, 16, dtype=torch.bfloat16)
        meta = torch.zeros(2, 5, dtype=torch.long)
        ch.gather(got, meta, 2)
        assert torch.equal(got, ref_rows) and torch.equal(meta, ref_meta)


@interpreter_only
def test_a_restarted_peer_is_readmitted_in_place_and_warms_up_alone(pair) -> None:
    """Rank 1's process 'restarts' (a new arena, same rank) after rounds with rank 0: rank 0
    maps the new arena in place (`readmit`: new deltas, the pair's words reset), the new rank
    1 connects to rank 0 only and warms up with itself alone (nothing sent to rank 0), and the
    next round between them is exact, with both sides counting from 0 again."""
    chans = [s.connect([pair[0].export(), pair[1].export()], timeout_s=1.0) for s in pair]
    rows, starts = torch.randn(3, 16).bfloat16(), torch.tensor([0, 0])

    def round_(a, b) -> tuple[torch.Tensor, torch.Tensor]:
        a.put_spans(rows, starts, torch.tensor([0, 3]), torch.arange(3))
        got, meta = torch.zeros(2, 4, 16, dtype=torch.bfloat16), torch.zeros(2, 5,
                                                                              dtype=torch.long)
        b.gather(got, meta, 2)
        return got, meta

    for ch in (chans[0]["a"], chans[1]["a"]):
        ch.set_peers([1 - ch.rank])
    round_(chans[0]["a"], chans[1]["a"])
    assert chans[0]["a"].sent.tolist() == [0, 1]
    new = SharedChannels.allocate(pair[1].layouts, 1)
    try:
        mask = torch.tensor([0, 0])  # rank 0 keeps rank 1 masked until it is warmed up
        for ch in chans[0].values():
            ch.peers = mask
        pair[0].readmit(new.export())
        fresh = new.connect([pair[0].export(), new.export()], timeout_s=1.0)
        peers = torch.tensor([1, 0])
        for ch in fresh.values():
            ch.peers = peers
        new.warm_up_alone(peers)
        assert peers.tolist() == [1, 0]
        for ch in fresh.values():  # the self rounds left nothing behind
            assert ch.sent.tolist() == ch.recvd.tolist() == [0, 0] and ch.sig.tolist() == [0, 0]
        a0 = chans[0]["a"]
        assert a0.sent.tolist() == [0, 0] and a0.credit.tolist() == [0, 0]
        mapped = a0.mappings[-1]  # the new arena as rank 0 maps it (its own mapping)
        assert len(a0.mappings) == 2
        want = (mapped.data_ptr() - pair[0].arena.data_ptr()) // a0.recv_buf.element_size()
        assert a0.delta[0].tolist() == [0, want]
        mask[1] = 1
        got, meta = round_(a0, fresh["a"])
        assert torch.equal(got[0, :3], rows) and meta[0, :4].tolist() == [3, 0, 1, 2]
        assert a0.sent.tolist() == [0, 1] and fresh["a"].recvd.tolist() == [1, 0]
        assert a0.credit.tolist() == [0, 1]  # the new process handed the slot back
    finally:
        new.close()


def test_bad_layouts_and_exports_are_named(pair, tmp_path) -> None:
    with pytest.raises(ValueError, match="hidden=12 must be a multiple of 8"):
        SharedChannels.allocate({"a": _lay(hidden=12)}, 0)
    with pytest.raises(ValueError, match="same world_size"):
        SharedChannels.allocate({"a": _lay(), "b": _lay(world_size=3)}, 0)
    with pytest.raises(ValueError, match="rank 2 is not a rank of a 2-rank"):
        SharedChannels.allocate({"a": _lay()}, 2)
    with pytest.raises(ValueError, match="must be cpu or cuda:N"):
        SharedChannels.allocate({"a": _lay()}, 0, "meta")
    e0, e1 = (s.export() for s in pair)
    with pytest.raises(ValueError, match=r"one export \(or None\) per rank \(2\), got 1"):
        pair[0].connect([e0])
    with pytest.raises(ValueError, match="not a distinct rank"):
        pair[0].connect([e0, e0])
    with pytest.raises(ValueError, match="not a shared-channels export"):
        pair[0].connect([e0, {"rank": 1}])
    with pytest.raises(ValueError, match="do not match this rank's"):
        pair[0].connect([e0, e1 | {"nbytes": 8}])
    with pytest.raises(ValueError, match="the export of rank 1 is not this rank.s"):
        pair[1].connect([e0, e0 | {"rank": 1}])
    with pytest.raises(ValueError, match="does not exist"):
        pair[0].connect([e0, e1 | {"handle": str(tmp_path / "gone")}])
    with pytest.raises(ValueError, match="timeout_s=0"):
        pair[0].connect([e0, e1], timeout_s=0)
    with pytest.raises(RuntimeError, match="call connect"):
        pair[0].channels
    pair[0].connect([e1, e0])
    with pytest.raises(RuntimeError, match="already connected"):
        pair[0].connect([e0, e1])


def test_server_loop_arguments_and_cpu_rules() -> None:
    cl = Cluster(1, torch.float32)
    chans = cl.channels[1]
    server = ServerExchange(cl.fmt, ExchangeChannels(chans.rows, chans.pairs, chans.results),
                            cl.servers[0].experts)
    with pytest.raises(ValueError, match="non-empty and distinct"):
        ServerLoop(server, [0, 0])
    with pytest.raises(ValueError, match=r"layers \[7\]: no experts"):
        ServerLoop(server, [0, 7])
    with pytest.raises(ValueError, match="ahead=0"):
        ServerLoop(server, [0], ahead=0)
    loop = ServerLoop(server, [0, 1])
    with pytest.raises(ValueError, match="steps=0"):
        loop.request(0)
    with pytest.raises(RuntimeError, match="CUDA graphs need a CUDA device"):
        loop.capture()
    assert loop.failures().tolist() == [[0, 0, 0], [0, 0, 0]]


class _FakeExchange:
    """What ServerLoop needs of a ServerExchange: experts, channels.device, a call per round."""

    def __init__(self) -> None:
        self.experts = {1: None, 3: None}
        self.channels = SimpleNamespace(device=torch.device("cpu"))
        self.calls: list[int] = []

    def __call__(self, layer: int) -> None:
        self.calls.append(layer)


async def test_server_loop_runs_requested_steps_in_layer_order() -> None:
    """start() enqueues at once; serve() enqueues what request() asks for, every step = one
    round per layer in the given order; run() while serve() runs is refused."""
    ex = _FakeExchange()
    loop = ServerLoop(ex, [3, 1], ahead=2)
    loop.start(2)
    assert ex.calls == [3, 1, 3, 1] and loop.steps_enqueued == 2 and loop.steps_done == 0
    await loop.drain()
    assert loop.steps_done == 2
    server = asyncio.create_task(loop.serve())
    loop.request(3)  # one host message for a batch of 3 steps
    loop.request(1)
    while loop.steps_done < 6:
        await asyncio.sleep(0)
    assert ex.calls == [3, 1] * 6 and loop.requested == loop.steps_enqueued == 6
    with pytest.raises(RuntimeError, match="already enqueuing"):
        await loop.run(1)
    server.cancel()
    with pytest.raises(asyncio.CancelledError):
        await server
    await loop.run(2)
    assert loop.steps_done == loop.requested == 8 and len(ex.calls) == 16
