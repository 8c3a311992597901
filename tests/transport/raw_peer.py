"""Hostile and hand-driven peers for the security tests: raw sockets, a handshake done by hand
(to replay it, or to get past it and then send bad frames), crafted frames."""

from __future__ import annotations

import asyncio
import subprocess
from pathlib import Path
from urllib.parse import urlsplit

import msgpack

from eaas.transport.auth import TlsFiles
from eaas.transport.codec import EXT_TUPLE, MAGIC, PREFIX
from eaas.transport.handshake import HELLO_MAGIC, NONCE_BYTES, _mac

SECRET = b"test-cluster-secret-0123456789abcdef"
CHALLENGE = len(HELLO_MAGIC) + NONCE_BYTES


async def raw_open(url: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A plain socket to a tcp:// or unix-socket (shm://, ...) listener."""
    parts = urlsplit(url)
    if parts.scheme == "tcp":
        return await asyncio.open_connection(parts.hostname, parts.port)
    return await asyncio.open_unix_connection(parts.path)


async def raw_handshake(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                        secret: bytes = SECRET, nonce: bytes = b"n" * NONCE_BYTES) -> bytes:
    """Answer the server's challenge as a client holding `secret`; returns what was sent."""
    challenge = await asyncio.wait_for(reader.readexactly(CHALLENGE), 5)
    assert challenge[:4] == HELLO_MAGIC
    sent = HELLO_MAGIC + nonce + _mac(secret, b"eaas/client\0", challenge[4:], nonce)
    writer.write(sent)
    await writer.drain()
    return sent


async def closed_by_peer(reader: asyncio.StreamReader, timeout: float = 5.0) -> bool:
    """True once the peer closed the connection (whatever it sent before is read and dropped)."""
    async with asyncio.timeout(timeout):
        try:
            while await reader.read(1 << 16):
                pass
        except ConnectionError:
            pass
    return True


def nested_ext_frame(depth: int = 200) -> bytes:
    """A ~1 KB frame whose tree nests `depth` TUPLE extensions (this once segfaulted a server:
    msgpack recursed in C once per level through the extension hook)."""
    tree = msgpack.packb([])
    for _ in range(depth):
        tree = msgpack.packb(msgpack.ExtType(EXT_TUPLE, b"\x91" + tree))  # tuple of 1
    header = msgpack.packb({"k": 0, "m": tree, "t": []})
    return PREFIX.pack(MAGIC, len(header), 0) + header


def huge_frame_start(body_bytes: int) -> bytes:
    """Prefix + header of a frame announcing one uint8 tensor of `body_bytes` bytes."""
    header = msgpack.packb({"k": 0, "m": msgpack.packb(msgpack.ExtType(1, b"\x00")),
                            "t": [["uint8", [body_bytes], 0]]})
    return PREFIX.pack(MAGIC, len(header), body_bytes) + header


def self_signed(directory: Path, name: str) -> TlsFiles:
    """A fresh self-signed EC certificate and key (openssl CLI) in `directory`."""
    cert, key = directory / f"{name}.pem", directory / f"{name}.key"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                    "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", str(key), "-out",
                    str(cert), "-days", "1", "-subj", f"/CN={name}"],
                   check=True, capture_output=True)
    return TlsFiles(str(cert), str(key))
