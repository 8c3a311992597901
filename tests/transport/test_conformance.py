"""One conformance suite run over every scheme (inproc://, tcp://, shm://)."""

from __future__ import annotations

import asyncio

import pytest
import torch

from eaas.errors import AskTimeoutError, RemoteError, TransportError
from eaas.transport import DTYPES, Listener, RpcClient, TransportLimits, connect, listen, serve_rpc

from .conftest import LISTEN_URLS, Outcomes
from .test_codec import sample

pytestmark = pytest.mark.timeout(60)


def assert_same(got: torch.Tensor, want: torch.Tensor) -> None:
    assert got.dtype == want.dtype and got.shape == want.shape
    assert torch.equal(got.reshape(-1).view(torch.uint8), want.reshape(-1).view(torch.uint8))


async def test_every_dtype_round_trips(echo_listener: Listener) -> None:
    async with await connect(echo_listener.url) as conn:
        for dtype in DTYPES.values():
            x = sample(dtype, (5, 3))
            await conn.send({"rows": x, "none": x[:0]})
            out = await conn.recv(timeout=5)
            assert_same(out["rows"], x)
            assert_same(out["none"], x[:0])


async def test_work_unit_shapes_and_nested_values(echo_listener: Listener) -> None:
    unit = {"kind": "work", "ids": (3, 1, 4), "generation": 7, "step": {"layer": 2, "mb": [0, 1]},
            "rows": torch.randn(33, 16).to(torch.bfloat16),  # [N, H]
            "expert_ids": torch.randint(0, 8, (33,)),  # [N] int64
            "strided": torch.randn(8, 6).t(), "blob": b"\x00\x01", "f": 1.5, "none": None}
    async with await connect(echo_listener.url) as conn:
        await conn.send(unit)
        out = await conn.recv(timeout=5)
    assert {k: v for k, v in out.items() if not isinstance(v, torch.Tensor)} == {
        k: v for k, v in unit.items() if not isinstance(v, torch.Tensor)}
    for key in ("rows", "expert_ids", "strided"):
        assert torch.equal(out[key], unit[key]) and out[key].dtype == unit[key].dtype


async def test_large_message_round_trips(echo_listener: Listener) -> None:
    x = torch.randint(-(2**31), 2**31 - 1, ((64 << 20) // 4 + 17,), dtype=torch.int32)  # > 64 MiB
    async with await connect(echo_listener.url) as conn:
        await conn.send({"x": x, "small": torch.ones(3)})
        out = await conn.recv(timeout=30)
    assert torch.equal(out["x"], x) and torch.equal(out["small"], torch.ones(3))


async def test_many_in_flight_split_phase_sends_arrive_in_order(echo_listener: Listener) -> None:
    async with await connect(echo_listener.url) as conn:
        sizes = [1, 70_000, 0, 300_000] * 50  # mixes inline and shared-memory bodies on shm://
        handles = [conn.send_start({"i": i, "x": torch.full((n,), i, dtype=torch.int32)})
                   for i, n in enumerate(sizes)]
        for i, n in enumerate(sizes):
            out = await conn.recv(timeout=10)
            assert out["i"] == i and out["x"].shape == (n,) and bool((out["x"] == i).all())
        for handle in handles:
            await asyncio.wait_for(handle, 5)  # every handle completes (SendHandle is awaitable)
            assert handle.done()


async def test_recv_after_local_close_raises_transport_error(echo_listener: Listener) -> None:
    conn = await connect(echo_listener.url)
    await conn.aclose()
    await conn.aclose()  # idempotent
    assert conn.closed
    with pytest.raises(TransportError):
        await conn.recv(timeout=5)
    with pytest.raises(TransportError):
        conn.send_start({"x": 1})


async def test_peer_close_is_seen_after_the_messages_it_sent(scheme: str) -> None:
    async def say_twice_and_close(conn):  # the handler's return closes the connection
        await conn.send("one")
        await conn.send({"two": torch.arange(100_000)})

    listener = await listen(LISTEN_URLS[scheme], say_twice_and_close)
    try:
        async with await connect(listener.url) as conn:
            assert await conn.recv(timeout=5) == "one"
            assert torch.equal((await conn.recv(timeout=5))["two"], torch.arange(100_000))
            with pytest.raises(TransportError):
                await conn.recv(timeout=5)
            assert conn.closed
    finally:
        await listener.aclose()


async def test_recv_timeout_raises_timeout_error_and_connection_stays_usable(
        echo_listener: Listener) -> None:
    async with await connect(echo_listener.url) as conn:
        with pytest.raises(TimeoutError):
            await conn.recv(timeout=0.01)
        await conn.send("still here")
        assert await conn.recv(timeout=5) == "still here"


async def test_connect_to_nobody_raises_transport_error(scheme: str) -> None:
    listener = await listen(LISTEN_URLS[scheme], lambda conn: asyncio.sleep(0))
    url = listener.url
    await listener.aclose()
    with pytest.raises(TransportError):
        await connect(url, timeout=2)


async def test_listener_close_ends_open_connections(echo_listener: Listener) -> None:
    conn = await connect(echo_listener.url)
    await conn.send("ping")
    assert await conn.recv(timeout=5) == "ping"
    await echo_listener.aclose()
    with pytest.raises(TransportError):
        await conn.recv(timeout=5)
    await conn.aclose()


# ---- RPC ---------------------------------------------------------------------------------
async def rpc_handler(msg):
    if msg.get("raise"):
        raise KeyError(msg["raise"])
    await asyncio.sleep(msg.get("delay", 0))  # replies overtake each other
    return {"echo": msg["i"], "x": msg.get("x")}


@pytest.fixture
async def rpc_listener(scheme: str):
    listener = await listen(LISTEN_URLS[scheme], lambda conn: serve_rpc(conn, rpc_handler))
    yield listener
    await listener.aclose()


async def test_rpc_replies_are_matched_to_their_requests(rpc_listener: Listener) -> None:
    async with RpcClient(await connect(rpc_listener.url)) as client:
        calls = [client.call({"i": i, "delay": (50 - i) * 1e-4, "x": torch.full((i,), i)},
                             timeout=10) for i in range(50)]
        for i, reply in enumerate(await asyncio.gather(*calls)):
            assert reply["echo"] == i and torch.equal(reply["x"], torch.full((i,), i))


async def test_rpc_handler_error_is_raised_at_the_caller_as_remote_error(
        rpc_listener: Listener) -> None:
    async with RpcClient(await connect(rpc_listener.url)) as client:
        with pytest.raises(RemoteError) as info:
            await client.call({"i": 0, "raise": "boom"}, timeout=5)
        assert info.value.type_name == "KeyError" and "boom" in info.value.message
        assert (await client.call({"i": 1}, timeout=5))["echo"] == 1  # the server went on


async def test_rpc_deadline_raises_ask_timeout_and_late_reply_is_dropped(
        rpc_listener: Listener) -> None:
    async with RpcClient(await connect(rpc_listener.url)) as client:
        with pytest.raises(AskTimeoutError):
            await client.call({"i": 0, "delay": 0.2}, timeout=0.02)
        assert (await client.call({"i": 1, "delay": 0.3}, timeout=5))["echo"] == 1


async def test_rpc_pending_calls_fail_at_once_when_the_peer_dies(scheme: str) -> None:
    entered = asyncio.Event()

    async def hang(msg):
        entered.set()
        await asyncio.Event().wait()

    listener = await listen(LISTEN_URLS[scheme], lambda conn: serve_rpc(conn, hang))
    async with RpcClient(await connect(listener.url)) as client:
        call = asyncio.ensure_future(client.call({"i": 0}, timeout=30))
        await asyncio.wait_for(entered.wait(), 5)
        await listener.aclose()  # kills the server side of the connection
        with pytest.raises(TransportError):
            await asyncio.wait_for(call, 5)
        with pytest.raises(TransportError):
            await client.call({"i": 1}, timeout=5)


async def test_rpc_works_in_both_directions_on_one_connection(scheme: str) -> None:
    server_got: asyncio.Future[object] = asyncio.get_running_loop().create_future()

    async def server(conn):
        async with RpcClient(conn, rpc_handler) as peer:  # serves requests and calls back
            server_got.set_result(await peer.call("hello?", timeout=5))
            await asyncio.Event().wait()  # keep serving until the listener closes

    async def answer(msg):
        return f"{msg} hello!"

    listener = await listen(LISTEN_URLS[scheme], server)
    try:
        async with RpcClient(await connect(listener.url), answer) as client:
            assert (await client.call({"i": 5}, timeout=5))["echo"] == 5
            assert await asyncio.wait_for(server_got, 5) == "hello? hello!"
    finally:
        await listener.aclose()


async def test_outcomes_fixture_sees_clean_close(echo_listener: Listener, outcomes: Outcomes):
    async with await connect(echo_listener.url) as conn:
        await conn.send(1)
        await conn.recv(timeout=5)
    count, error = await outcomes.next()
    assert count == 1 and type(error) is TransportError


# ---- flow control, split phase, handler failures -----------------------------------------
@pytest.mark.parametrize("scheme", ["inproc", "tcp"])  # shm:// stalls on slot credits (test_shm)
async def test_send_handle_completes_only_when_the_peer_takes_the_bytes(scheme: str) -> None:
    go = asyncio.Event()
    got: asyncio.Queue[object] = asyncio.Queue()

    async def slow_reader(conn):
        await go.wait()
        while True:
            got.put_nowait(await conn.recv(timeout=30))

    # the peer's inbox holds one message; reading from the socket pauses while it is full
    limits = TransportLimits(max_queued_messages=1)
    listener = await listen(LISTEN_URLS[scheme], slow_reader, limits=limits)
    try:
        async with await connect(listener.url, limits=limits) as conn:
            msgs = [torch.zeros(16 << 20, dtype=torch.uint8)] * 3 if scheme == "tcp" else [1, 2, 3]
            handles = [conn.send_start(m) for m in msgs]
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(asyncio.gather(*handles), 0.1)
            assert not handles[-1].done()
            go.set()
            await asyncio.wait_for(asyncio.gather(*handles), 30)
            for _ in msgs:
                await got.get()
    finally:
        await listener.aclose()


async def test_receiver_that_falls_behind_pauses_the_sender_and_loses_nothing(scheme: str):
    limits = TransportLimits(max_queued_messages=4, shm_min_bytes=1024)
    received: asyncio.Queue[object] = asyncio.Queue()
    go = asyncio.Event()

    async def late_reader(conn):
        await go.wait()
        while True:
            received.put_nowait(await conn.recv(timeout=30))

    listener = await listen(LISTEN_URLS[scheme], late_reader, limits=limits)
    try:
        async with await connect(listener.url, limits=limits) as conn:
            handles = [conn.send_start({"i": i, "x": torch.full((500,), i)}) for i in range(60)]
            go.set()
            await asyncio.wait_for(asyncio.gather(*handles), 30)
            for i in range(60):
                msg = await asyncio.wait_for(received.get(), 10)
                assert msg["i"] == i and bool((msg["x"] == i).all())
    finally:
        await listener.aclose()


async def test_local_close_discards_unread_messages(echo_listener: Listener) -> None:
    conn = await connect(echo_listener.url)
    await conn.send("echoed back")
    await conn.aclose()
    with pytest.raises(TransportError):
        await conn.recv(timeout=5)


async def test_a_handler_that_raises_does_not_stop_the_listener(scheme: str) -> None:
    async def picky(conn):
        msg = await conn.recv(timeout=5)
        if msg == "bad":
            raise RuntimeError("handler bug")
        await conn.send(msg)

    listener = await listen(LISTEN_URLS[scheme], picky)
    try:
        async with await connect(listener.url) as bad:
            await bad.send("bad")
            with pytest.raises(TransportError):
                await bad.recv(timeout=5)  # its connection was closed
        async with await connect(listener.url) as good:
            await good.send("good")
            assert await good.recv(timeout=5) == "good"
    finally:
        await listener.aclose()


async def test_reading_pauses_on_queued_bytes_not_only_message_count() -> None:
    go = asyncio.Event()
    got: asyncio.Queue[object] = asyncio.Queue()

    async def slow_reader(conn):
        await go.wait()
        while True:
            got.put_nowait(await conn.recv(timeout=30))

    limits = TransportLimits(max_queued_bytes=1 << 20)  # 1024 messages, but only 1 MiB
    listener = await listen("tcp://127.0.0.1:0", slow_reader, limits=limits)
    try:
        async with await connect(listener.url) as conn:
            handles = [conn.send_start(torch.zeros(8 << 20, dtype=torch.uint8)) for _ in range(4)]
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(asyncio.gather(*handles), 0.1)
            go.set()
            await asyncio.wait_for(asyncio.gather(*handles), 30)
            for _ in handles:
                assert (await asyncio.wait_for(got.get(), 10)).shape == (8 << 20,)
    finally:
        await listener.aclose()
