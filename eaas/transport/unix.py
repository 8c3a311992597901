"""Unix-socket listen/connect for the same-host schemes (shm://, cudaipc://).

URLs are `SCHEME:///absolute/socket/path`; listening on `SCHEME://` (no path) picks a fresh
socket path in the temp dir. The socket file is made owner-only (0600) and removed on close.
With a TransportSecurity both ends run the HMAC handshake first (no TLS: same host).
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import os
import secrets
import tempfile
from typing import TYPE_CHECKING, Callable
from urllib.parse import urlsplit

from eaas.errors import TransportError
from eaas.transport.base import Handler
from eaas.transport.limits import TransportLimits
from eaas.transport.stream import StreamConnection, StreamListener, connect_stream

if TYPE_CHECKING:
    from eaas.transport.auth import TransportSecurity

__all__ = ["UnixListener", "unix_listen", "unix_connect", "socket_path"]

_COUNTER = itertools.count()


def socket_path(url: str, scheme: str) -> str:
    """The socket path of `scheme:///path` ("" for `scheme://`); ValueError if malformed."""
    parts = urlsplit(url)
    if parts.scheme != scheme or parts.netloc:
        raise ValueError(f"bad {scheme} URL {url!r}: expected {scheme}:///absolute/socket/path "
                         f"(or {scheme}:// to listen on a fresh path)")
    return parts.path


class UnixListener(StreamListener):
    """StreamListener on a unix socket; removes the socket file on close."""

    def __init__(self, handler: Handler, limits: TransportLimits,
                 conn_class: Callable[..., StreamConnection], scheme: str,
                 security: TransportSecurity | None = None) -> None:
        super().__init__(handler, limits, conn_class=conn_class, security=security)
        self.scheme = scheme
        self.path = ""  # the socket file, removed on close

    async def aclose(self) -> None:
        await super().aclose()
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass


async def unix_listen(url: str, handler: Handler, limits: TransportLimits, *, scheme: str,
                      conn_class: Callable[..., StreamConnection], stem: str,
                      security: TransportSecurity | None = None) -> UnixListener:
    """Listen on `url`'s socket path, or on a fresh `{tempdir}/{stem}-{pid}-....sock`."""
    path = socket_path(url, scheme)
    if not path:
        path = os.path.join(tempfile.gettempdir(),
                            f"{stem}-{os.getpid():x}-{next(_COUNTER)}-{secrets.token_hex(3)}.sock")
    listener = UnixListener(handler, limits, conn_class, scheme, security)
    listener.url = f"{scheme}://{path}"
    listener.path = path
    try:
        listener._server = await asyncio.get_running_loop().create_unix_server(
            lambda: listener.protocol_factory(f"{listener.url} (accepted)"), path)
        os.chmod(path, 0o600)
    except OSError as exc:
        raise TransportError(f"cannot listen on {url}: {exc}") from exc
    return listener


async def unix_connect(url: str, timeout: float, limits: TransportLimits, *, scheme: str,
                       conn_class: Callable[..., StreamConnection],
                       security: TransportSecurity | None = None) -> StreamConnection:
    """Connect a `conn_class` to `url`'s socket path; TransportError if nobody listens
    (AuthError if the handshake fails)."""
    path = socket_path(url, scheme)
    open_conn = functools.partial(asyncio.get_running_loop().create_unix_connection, path=path)
    return await connect_stream(open_conn, lambda: conn_class(url, limits), url, timeout,
                                security)
