"""The cluster-secret handshake on tcp:// and shm:// listeners: peers with the secret talk;
no secret, a wrong secret, a replayed handshake, random bytes, a silent peer are refused before
any frame is read, counted, and the listener keeps serving."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator

import pytest

from eaas.errors import AuthError, TransportError
from eaas.transport import (Listener, RpcClient, TransportSecurity, connect, listen, serve_rpc)
from eaas.transport.auth import SECRET_ENV, cluster_secret, ensure_cluster_secret

from .raw_peer import SECRET, closed_by_peer, huge_frame_start, raw_handshake, raw_open

pytestmark = pytest.mark.timeout(60)
SECURITY = TransportSecurity(SECRET, handshake_timeout_s=2.0)


async def echo(msg: object) -> object:
    return msg


@pytest.fixture(params=["tcp://127.0.0.1:0", "shm://"], ids=["tcp", "shm"])
async def guarded(request: pytest.FixtureRequest) -> AsyncIterator[Listener]:
    listener = await listen(request.param, lambda c: serve_rpc(c, echo), security=SECURITY)
    yield listener
    await listener.aclose()


async def assert_serves(listener: Listener) -> None:
    async with RpcClient(await connect(listener.url, security=SECURITY)) as client:
        assert await client.call({"still": "serving"}, timeout=5) == {"still": "serving"}


def refused(listener: Listener, reason: str) -> int:
    return listener.stats.snapshot()["refused_by"][reason]


async def test_peers_holding_the_secret_talk(guarded: Listener) -> None:
    await assert_serves(guarded)
    await assert_serves(guarded)
    snap = guarded.stats.snapshot()
    assert snap["accepted"] == 2 and snap["refused"] == 0


async def test_a_client_without_the_secret_is_refused_and_counted(guarded: Listener) -> None:
    async with RpcClient(await connect(guarded.url)) as client:  # sends a frame at once
        with pytest.raises(TransportError):
            await client.call({"op": "unload"}, timeout=5)
    assert refused(guarded, "no_handshake") == 1
    await assert_serves(guarded)


async def test_a_wrong_secret_is_refused_on_both_sides(guarded: Listener) -> None:
    wrong = TransportSecurity(b"another-secret-of-this-cluster!!")
    with pytest.raises(AuthError, match="another cluster secret"):
        await connect(guarded.url, security=wrong)
    assert refused(guarded, "bad_proof") == 1
    await assert_serves(guarded)


async def test_a_replayed_handshake_is_refused(guarded: Listener) -> None:
    reader, writer = await raw_open(guarded.url)  # a legitimate client, recorded
    recorded = await raw_handshake(reader, writer)
    await reader.readexactly(32)  # the server's proof: this one was accepted
    writer.close()
    reader, writer = await raw_open(guarded.url)  # the recording, played to a new connection
    await reader.readexactly(36)  # a fresh challenge
    writer.write(recorded)
    assert await closed_by_peer(reader)
    writer.close()
    assert refused(guarded, "bad_proof") == 1
    assert guarded.stats.snapshot()["accepted"] == 1
    await assert_serves(guarded)


@pytest.mark.parametrize("payload", [os.urandom(4096), huge_frame_start(200 << 20)],
                         ids=["random-bytes", "plain-frame-of-200MiB"])
async def test_bytes_that_are_no_handshake_are_refused(guarded: Listener, payload: bytes) -> None:
    reader, writer = await raw_open(guarded.url)
    writer.write(payload)
    assert await closed_by_peer(reader)
    writer.close()
    assert refused(guarded, "no_handshake") == 1
    await assert_serves(guarded)


async def test_a_silent_peer_is_dropped_at_the_handshake_deadline() -> None:
    quick = TransportSecurity(SECRET, handshake_timeout_s=0.2)
    listener = await listen("tcp://127.0.0.1:0", lambda c: serve_rpc(c, echo), security=quick)
    try:
        reader, writer = await raw_open(listener.url)
        assert await closed_by_peer(reader, timeout=5)  # says nothing: dropped after 0.2 s
        writer.close()
        assert refused(listener, "timeout") == 1
    finally:
        await listener.aclose()


async def test_a_listener_without_the_secret_is_not_trusted() -> None:
    plain = await listen("tcp://127.0.0.1:0", lambda c: serve_rpc(c, echo))  # an impostor
    try:
        with pytest.raises(TransportError):
            await connect(plain.url, security=TransportSecurity(SECRET, handshake_timeout_s=0.3))
    finally:
        await plain.aclose()


def test_cluster_secret_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch,
                                                   tmp_path) -> None:
    monkeypatch.delenv(SECRET_ENV, raising=False)
    with pytest.raises(AuthError, match=SECRET_ENV):
        cluster_secret()
    monkeypatch.setenv(SECRET_ENV, "short")
    with pytest.raises(AuthError, match="at least 16"):
        cluster_secret()
    monkeypatch.delenv(SECRET_ENV)
    generated = ensure_cluster_secret()  # the engine at start: a fresh one, for its children
    assert len(generated) == 64 and os.environ[SECRET_ENV] == generated.decode()
    assert ensure_cluster_secret() == generated  # idempotent
    path = tmp_path / "secret"
    path.write_text("from-a-file-0123456789\n")
    path.chmod(0o600)
    assert ensure_cluster_secret(str(path)) == b"from-a-file-0123456789"  # the file wins
    assert cluster_secret() == b"from-a-file-0123456789"


def test_security_never_prints_its_secret() -> None:
    assert SECRET.decode() not in repr(SECURITY)
