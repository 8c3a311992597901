"""tcp://host:port — framed messages over asyncio TCP streams (works across hosts)."""

from __future__ import annotations

import asyncio
from urllib.parse import urlsplit

from eaas.errors import TransportError
from eaas.transport.base import Handler
from eaas.transport.limits import TransportLimits
from eaas.transport.stream import StreamConnection, StreamListener

__all__ = ["tcp_connect", "tcp_listen"]


def _host_port(url: str) -> tuple[str, int]:
    parts = urlsplit(url)
    if parts.scheme != "tcp" or parts.hostname is None or parts.port is None:
        raise ValueError(f"bad tcp URL {url!r}: expected tcp://host:port (port 0 = any)")
    return parts.hostname, parts.port


def _format(host: str, port: int) -> str:
    return f"tcp://[{host}]:{port}" if ":" in host else f"tcp://{host}:{port}"


async def tcp_listen(url: str, handler: Handler, limits: TransportLimits) -> StreamListener:
    host, port = _host_port(url)
    listener = StreamListener(handler, limits)
    loop = asyncio.get_running_loop()
    try:
        server = await loop.create_server(
            lambda: listener.protocol_factory(f"{listener.url} (accepted)"), host, port)
    except OSError as exc:
        raise TransportError(f"cannot listen on {url}: {exc}") from exc
    listener._server = server
    bound = server.sockets[0].getsockname()
    listener.url = _format(host, bound[1])
    return listener


async def tcp_connect(url: str, timeout: float, limits: TransportLimits) -> StreamConnection:
    host, port = _host_port(url)
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(timeout):
            _, conn = await loop.create_connection(
                lambda: StreamConnection(url, limits), host, port)
    except TimeoutError:
        raise TransportError(f"connect to {url} timed out after {timeout} s") from None
    except OSError as exc:
        raise TransportError(f"cannot connect to {url}: {exc}") from exc
    return conn
