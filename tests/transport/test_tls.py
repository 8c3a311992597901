"""tcp:// over TLS (the standard `ssl` module; mutual, one self-signed cluster certificate made
here with the openssl CLI): peers with the certificate and the secret talk encrypted; a plain
peer, random bytes and a certificate from another CA are refused and counted."""

from __future__ import annotations

import asyncio
import os
import shutil
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import torch

from eaas.errors import AuthError, TransportError
from eaas.transport import (Listener, RpcClient, TlsFiles, TransportSecurity, connect, listen,
                            serve_rpc)

from .raw_peer import SECRET, closed_by_peer, raw_open, self_signed

pytestmark = [pytest.mark.timeout(60),
              pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl CLI")]


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, TlsFiles]:
    d = tmp_path_factory.mktemp("tls")
    return {"cluster": self_signed(d, "eaas-cluster"), "other": self_signed(d, "other-ca")}


async def echo(msg: object) -> object:
    return msg


@pytest.fixture
async def tls_listener(certs) -> AsyncIterator[tuple[Listener, TransportSecurity]]:
    security = TransportSecurity(SECRET, certs["cluster"], handshake_timeout_s=1.0)
    listener = await listen("tcp://127.0.0.1:0", lambda c: serve_rpc(c, echo), security=security)
    yield listener, security
    await listener.aclose()


async def test_peers_with_the_certificate_and_secret_talk_over_tls(tls_listener) -> None:
    listener, security = tls_listener
    conn = await connect(listener.url, security=security)
    assert conn._transport.get_extra_info("ssl_object") is not None  # encrypted
    async with RpcClient(conn) as client:
        rows = torch.randn(4096, 64)  # [N, H], 1 MiB through TLS
        reply = await client.call({"rows": rows, "i": 1}, timeout=10)
        assert reply["i"] == 1 and torch.equal(reply["rows"], rows)
    assert listener.stats.snapshot()["accepted"] == 1


async def test_a_plain_peer_and_random_bytes_are_refused(tls_listener) -> None:
    listener, security = tls_listener
    with pytest.raises(TransportError):  # the secret but no TLS
        await connect(listener.url, security=TransportSecurity(SECRET, handshake_timeout_s=0.5))
    reader, writer = await raw_open(listener.url)
    writer.write(os.urandom(4096))
    assert await closed_by_peer(reader)
    writer.close()
    assert listener.stats.snapshot()["refused_by"]["tls"] == 2
    async with RpcClient(await connect(listener.url, security=security)) as client:
        assert await client.call("still serving", timeout=10) == "still serving"


async def test_a_certificate_of_another_ca_is_refused(tls_listener, certs) -> None:
    listener, _ = tls_listener
    with pytest.raises(AuthError, match="TLS"):
        await connect(listener.url, security=TransportSecurity(SECRET, certs["other"]))
    async with asyncio.timeout(5):  # the client gave up first; the server sees the reset next
        while listener.stats.snapshot()["refused_by"]["tls"] != 1:
            await asyncio.sleep(0.01)


def test_unreadable_tls_files_are_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="cannot load TLS files"):
        TlsFiles(str(tmp_path / "missing.pem"), str(tmp_path / "missing.key")).server_context()
