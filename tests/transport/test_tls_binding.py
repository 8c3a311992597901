"""The HMAC handshake is bound to the TLS channel (tls-unique; eaas.transport.handshake): a man
in the middle who holds a certificate the cluster trusts but not the secret, terminating TLS
separately towards each side and relaying the bytes, fails the handshake on both sides; the
same relay over plain TCP gets through (what TLS is for), and direct TLS works on 1.2 and 1.3."""

from __future__ import annotations

import asyncio
import shutil
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from urllib.parse import urlsplit

import pytest

from eaas.errors import AuthError
from eaas.transport import RpcClient, TlsFiles, TransportSecurity, connect, listen, serve_rpc
from eaas.transport.handshake import channel_binding

from .raw_peer import SECRET, self_signed

pytestmark = [pytest.mark.timeout(60),
              pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl CLI")]


class Tls12Files(TlsFiles):
    """The cluster's files with TLS capped at 1.2 (the other branch of tls-unique)."""

    __slots__ = ()

    def _context(self, purpose: ssl.Purpose) -> ssl.SSLContext:
        ctx = TlsFiles._context(self, purpose)
        ctx.maximum_version = ssl.TLSVersion.TLSv1_2
        return ctx


@pytest.fixture(scope="module")
def cluster_tls(tmp_path_factory: pytest.TempPathFactory) -> TlsFiles:
    return self_signed(tmp_path_factory.mktemp("tls-binding"), "eaas-cluster")


async def echo(msg: object) -> object:
    return msg


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(1 << 16):
            writer.write(data)
            await writer.drain()
    except ConnectionError:
        pass
    finally:
        writer.close()


@asynccontextmanager
async def relay(target_url: str, tls: TlsFiles | None) -> AsyncIterator[str]:
    """A man in the middle: accepts on its own port (over TLS with `tls`, a certificate the
    cluster trusts), opens a second connection (a second TLS session) to `target_url`, and
    copies bytes both ways. Yields the URL that victims are pointed at."""
    target = urlsplit(target_url)
    pipes: set[asyncio.Task[None]] = set()

    async def on_client(c_reader: asyncio.StreamReader, c_writer: asyncio.StreamWriter) -> None:
        s_reader, s_writer = await asyncio.open_connection(
            target.hostname, target.port, ssl=tls.client_context() if tls else None)
        for task in (_pipe(c_reader, s_writer), _pipe(s_reader, c_writer)):
            pipes.add(asyncio.create_task(task))

    server = await asyncio.start_server(on_client, "127.0.0.1", 0,
                                        ssl=tls.server_context() if tls else None)
    try:
        yield f"tcp://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    finally:
        server.close()
        for task in pipes:
            task.cancel()
        await asyncio.gather(*pipes, return_exceptions=True)


@pytest.mark.parametrize("version", ["TLSv1.3", "TLSv1.2"])
async def test_direct_tls_binds_and_passes(cluster_tls: TlsFiles, version: str) -> None:
    files = cluster_tls if version == "TLSv1.3" else Tls12Files(cluster_tls.cert, cluster_tls.key)
    security = TransportSecurity(SECRET, files, handshake_timeout_s=2.0)
    listener = await listen("tcp://127.0.0.1:0", lambda c: serve_rpc(c, echo), security=security)
    try:
        conn = await connect(listener.url, security=security)
        ssl_object = conn._transport.get_extra_info("ssl_object")
        assert ssl_object.version() == version
        assert channel_binding(conn._transport).startswith(b"tls-unique:")
        async with RpcClient(conn) as client:
            assert await client.call("over tls", timeout=10) == "over tls"
        assert listener.stats.snapshot()["accepted"] == 1
    finally:
        await listener.aclose()


@pytest.mark.parametrize("version", ["TLSv1.3", "TLSv1.2"])
async def test_a_relay_between_two_tls_sessions_fails_the_handshake(
        cluster_tls: TlsFiles, version: str) -> None:
    files = cluster_tls if version == "TLSv1.3" else Tls12Files(cluster_tls.cert, cluster_tls.key)
    security = TransportSecurity(SECRET, files, handshake_timeout_s=2.0)
    listener = await listen("tcp://127.0.0.1:0", lambda c: serve_rpc(c, echo), security=security)
    try:
        async with relay(listener.url, files) as mitm_url:
            with pytest.raises(AuthError, match="closed the connection on our proof"):
                await connect(mitm_url, security=security, timeout=5.0)
        stats = listener.stats.snapshot()
        assert stats["refused_by"]["bad_proof"] == 1 and stats["accepted"] == 0
        async with RpcClient(await connect(listener.url, security=security)) as client:
            assert await client.call("still serving", timeout=10) == "still serving"
    finally:
        await listener.aclose()


async def test_plain_tcp_authenticates_and_a_relay_passes_without_tls() -> None:
    """Plain tcp:// still authenticates (an empty binding); the relay that TLS stops above gets
    through here: the HMAC alone authenticates peers, it does not protect the wire."""
    security = TransportSecurity(SECRET, handshake_timeout_s=2.0)
    listener = await listen("tcp://127.0.0.1:0", lambda c: serve_rpc(c, echo), security=security)
    try:
        conn = await connect(listener.url, security=security)
        assert channel_binding(conn._transport) == b""
        async with RpcClient(conn) as client:
            assert await client.call("plain", timeout=10) == "plain"
        async with relay(listener.url, None) as mitm_url:
            async with RpcClient(await connect(mitm_url, security=security)) as client:
                assert await client.call("relayed", timeout=10) == "relayed"
        assert listener.stats.snapshot()["accepted"] == 2
    finally:
        await listener.aclose()
