"""`connect` / `listen`: pick the transport implementation by URL scheme."""

from __future__ import annotations

from eaas.transport.base import Connection, Handler, Listener
from eaas.transport.cudaipc import cudaipc_connect, cudaipc_listen
from eaas.transport.inproc import inproc_connect, inproc_listen
from eaas.transport.limits import TransportLimits
from eaas.transport.nvshmem import nvshmem_connect, nvshmem_listen
from eaas.transport.shm import shm_connect, shm_listen
from eaas.transport.tcp import tcp_connect, tcp_listen

__all__ = ["connect", "listen", "SCHEMES"]

_LISTEN = {"inproc": inproc_listen, "tcp": tcp_listen, "shm": shm_listen}
_CONNECT = {"inproc": inproc_connect, "tcp": tcp_connect, "shm": shm_connect}
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


async def listen(url: str, handler: Handler, *,
                 limits: TransportLimits = TransportLimits()) -> Listener:
    """Listen on `url` and run `await handler(conn)` for every accepted connection.

    url: inproc://name (empty name: a fresh one), tcp://host:port (port 0: any free port),
         shm:///socket/path (shm://: a fresh path in the temp dir), cudaipc:// likewise,
         nvshmem:// (needs a joined fabric, see eaas.transport.nvshmem). `listener.url` is the
         address peers should connect to (port, path and, nvshmem://, rank resolved).
    The handler runs in a task the listener owns; when it returns or raises, its connection is
    closed; other connections are unaffected. `await listener.aclose()` stops everything.
    """
    return await _LISTEN[_scheme(url)](url, handler, limits)


async def connect(url: str, *, timeout: float = 5.0,
                  limits: TransportLimits = TransportLimits()) -> Connection:
    """Connect to a listener's `url`; TransportError if nobody listens or `timeout` passes."""
    return await _CONNECT[_scheme(url)](url, timeout, limits)
