"""tcp://host:port — framed messages over asyncio TCP streams (works across hosts).

With a TransportSecurity both ends run the HMAC handshake first, over TLS when it has TLS
files. The listener binds exactly the host its URL names (never a wildcard of its own).
"""

from __future__ import annotations

import asyncio
import functools
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from eaas.errors import TransportError
from eaas.transport.base import Handler
from eaas.transport.limits import TransportLimits
from eaas.transport.stream import StreamConnection, StreamListener, connect_stream

if TYPE_CHECKING:
    from eaas.transport.auth import TransportSecurity

__all__ = ["tcp_connect", "tcp_listen"]


def _host_port(url: str) -> tuple[str, int]:
    parts = urlsplit(url)
    if parts.scheme != "tcp" or parts.hostname is None or parts.port is None:
        raise ValueError(f"bad tcp URL {url!r}: expected tcp://host:port (port 0 = any)")
    return parts.hostname, parts.port


def _format(host: str, port: int) -> str:
    return f"tcp://[{host}]:{port}" if ":" in host else f"tcp://{host}:{port}"


async def tcp_listen(url: str, handler: Handler, limits: TransportLimits,
                     security: TransportSecurity | None = None) -> StreamListener:
    host, port = _host_port(url)
    tls = security.tls.server_context() if security is not None and security.tls else None
    listener = StreamListener(handler, limits, security=security, tls=tls)
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


async def tcp_connect(url: str, timeout: float, limits: TransportLimits,
                      security: TransportSecurity | None = None) -> StreamConnection:
    host, port = _host_port(url)
    loop = asyncio.get_running_loop()
    tls = security.tls.client_context() if security is not None and security.tls else None
    open_conn = functools.partial(loop.create_connection, host=host, port=port, ssl=tls,
                                  ssl_handshake_timeout=timeout if tls else None)
    return await connect_stream(open_conn, lambda: StreamConnection(url, limits), url, timeout,
                                security)
