"""`connect` / `listen`: pick the transport implementation by URL scheme."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from eaas.transport.base import Connection, Handler, Listener
from eaas.transport.cudaipc import cudaipc_connect, cudaipc_listen
from eaas.transport.inproc import inproc_connect, inproc_listen
from eaas.transport.limits import TransportLimits
from eaas.transport.nvshmem import nvshmem_connect, nvshmem_listen
from eaas.transport.shm import shm_connect, shm_listen
from eaas.transport.tcp import tcp_connect, tcp_listen

if TYPE_CHECKING:
    from eaas.transport.auth import TransportSecurity

__all__ = ["connect", "listen", "SCHEMES"]

_LISTEN: dict[str, Callable[..., Awaitable[Listener]]] = {
    "inproc": inproc_listen, "tcp": tcp_listen, "shm": shm_listen}
_CONNECT: dict[str, Callable[..., Awaitable[Connection]]] = {
    "inproc": inproc_connect, "tcp": tcp_connect, "shm": shm_connect}
_LISTEN["cudaipc"], _CONNECT["cudaipc"] = cudaipc_listen, cudaipc_connect
_LISTEN["nvshmem"], _CONNECT["nvshmem"] = nvshmem_listen, nvshmem_connect
SCHEMES = tuple(_LISTEN)


def _scheme(url: str) -> str:
    if not isinstance(url, str) or "://" not in url:
        raise ValueError(f"transport URL {url!r} has no scheme; allowed: "
                         + ", ".join(f"{s}://" for s in SCHEMES))
    scheme = url.split("://", 1)[0]
    if scheme not in _LISTEN:
        raise ValueError(f"unknown transport scheme {scheme!r} in {url!r}; allowed: "
                         + ", ".join(f"{s}://" for s in SCHEMES))
    return scheme


async def listen(url: str, handler: Handler, *, limits: TransportLimits = TransportLimits(),
                 security: TransportSecurity | None = None) -> Listener:
    """Listen on `url` and run `await handler(conn)` for every accepted connection.

    url: inproc://name (empty name: a fresh one), tcp://host:port (port 0: any free port),
         shm:///socket/path (shm://: a fresh path in the temp dir), cudaipc:// likewise,
         nvshmem:// (needs a joined fabric, see eaas.transport.nvshmem). `listener.url` is the
         address peers should connect to (port, path and, nvshmem://, rank resolved).
    The handler runs in a task the listener owns; when it returns or raises, its connection is
    closed; other connections are unaffected. `await listener.aclose()` stops everything.
    security: authenticate every peer (HMAC handshake over the cluster secret; TLS on tcp://
    when it names TLS files) before its first frame; refusals are counted in
    `listener.stats`. None: no handshake. inproc:// has no peer to authenticate and ignores it.
    """
    scheme = _scheme(url)
    if scheme == "inproc":
        return await inproc_listen(url, handler, limits)
    return await _LISTEN[scheme](url, handler, limits, security)


async def connect(url: str, *, timeout: float = 5.0, limits: TransportLimits = TransportLimits(),
                  security: TransportSecurity | None = None) -> Connection:
    """Connect to a listener's `url`; TransportError if nobody listens or `timeout` passes.

    security: prove this end holds the cluster secret and check that the listener does too
    (AuthError, a TransportError, if either fails; the `timeout` covers the handshake).
    """
    scheme = _scheme(url)
    if scheme == "inproc":
        return await inproc_connect(url, timeout, limits)
    return await _CONNECT[scheme](url, timeout, limits, security)
