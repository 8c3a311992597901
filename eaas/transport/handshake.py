"""Mutual HMAC challenge-response at the start of every authenticated stream connection.

Both ends hold the cluster secret K (eaas.transport.auth). On connect, before any frame:

    server -> client   b"EAH1" + Ns                                               (36 bytes)
    client -> server   b"EAH1" + Nc + HMAC-SHA256(K, b"eaas/client\\0" + Ns + Nc + B)  (68 bytes)
    server -> client   HMAC-SHA256(K, b"eaas/server\\0" + Nc + Ns + B)                 (32 bytes)

Ns and Nc are 32 fresh random bytes per connection, so a recorded handshake replayed on a new
connection fails (the server's Ns differs); the role labels keep one side's proof from being
reflected as the other's; proofs are compared with `hmac.compare_digest`. The client proves
first, so the server answers nobody without the secret with anything but its nonce; the server
then proves itself too, so an engine never sends rows to a process that merely grabbed a
server's port (`connect` returns only after the server's proof checked out). The server reads
no frame until the client's proof checks out; before that, a peer can make it buffer at most
one read of bytes.

B is the channel binding (RFC 5929 / RFC 9266 style; `channel_binding`): empty on a plain
connection; over TLS (tcp://), b"tls-unique:" + the TLS channel's `tls-unique` value, which each
end reads from its own TLS session. A man in the middle who terminates TLS separately towards
each side (he holds a certificate the cluster trusts, but not the secret) can relay the
handshake bytes, but the two TLS sessions have different bindings, so the relayed proofs fail
on both sides (`bad_proof`) and he never gets a session to either.

Why tls-unique, on TLS 1.3 too: RFC 9266 defines `tls-exporter` for TLS 1.3 (and leaves
tls-unique undefined there), but Python 3.11's `ssl` has no keying-material exporter, and
`tls-unique` is the only type it offers (`ssl.CHANNEL_BINDING_TYPES`). On TLS 1.3 OpenSSL returns
for it the first Finished message's verify_data (the client's, in a full handshake): an HMAC over
the whole handshake transcript, both ephemeral key shares included, so both ends of one session
read the same value and two sessions never share one, which is what the relay defence needs.
Its known caveats do not bite here: a resumed session would bind to the abbreviated handshake,
but eaas never resumes one; on TLS 1.2 the triple-handshake attack needs a peer without extended
master secret, which OpenSSL 3 negotiates by default. When Python's ssl gains `tls-exporter`,
switch to it here.
Without TLS nothing binds the handshake to the wire: an active relay between two hosts is then
not stopped (run tcp:// across untrusted networks over TLS).

`HandshakeGate` is the asyncio protocol of a connection during the handshake; once it succeeds
it hands the transport to the real StreamConnection (`transport.set_protocol`) together with
any bytes that arrived behind the handshake. Failures close the connection and are counted in
the listener's `SecurityStats`.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import secrets
import socket
import ssl
from collections.abc import Callable
from typing import Any

from eaas.errors import AuthError

__all__ = ["HandshakeGate", "SecurityStats", "HELLO_MAGIC", "channel_binding"]

log = logging.getLogger("eaas.transport")

HELLO_MAGIC = b"EAH1"
NONCE_BYTES = 32
MAC_BYTES = 32
_CHALLENGE = len(HELLO_MAGIC) + NONCE_BYTES  # 36: the server's first message
_PROOF = len(HELLO_MAGIC) + NONCE_BYTES + MAC_BYTES  # 68: the client's answer
_SERVER_LABEL = b"eaas/server\0"
_CLIENT_LABEL = b"eaas/client\0"
REFUSALS = ("no_handshake", "bad_proof", "timeout", "incomplete", "tls")


TLS_BINDING = "tls-unique"  # the one type Python 3.11's ssl offers (see the module docstring)


def _mac(secret: bytes, label: bytes, first: bytes, second: bytes, binding: bytes = b"") -> bytes:
    # label and nonces have fixed lengths, so the variable-length binding last is unambiguous
    return hmac.new(secret, label + first + second + binding, hashlib.sha256).digest()


def channel_binding(transport: asyncio.BaseTransport) -> bytes:
    """B of the handshake for this connection: b"" without TLS, else b"tls-unique:" + the TLS
    session's tls-unique value (the same at both ends of one TLS session, different for two).

    Call it once the TLS handshake completed. AuthError if TLS runs but gives no binding.
    """
    ssl_object = transport.get_extra_info("ssl_object")
    if ssl_object is None:
        return b""
    value = ssl_object.get_channel_binding(TLS_BINDING)
    if not value:
        raise AuthError(f"the TLS session ({ssl_object.version()}) has no {TLS_BINDING} "
                        "channel binding; refusing to authenticate over it")
    return TLS_BINDING.encode() + b":" + value


class SecurityStats:
    """What one listener refused: `snapshot()` -> {"accepted", "refused", "refused_by",
    "bad_frames"}. refused_by: no_handshake (not an eaas handshake: random bytes, a plain
    frame, a client without the secret), bad_proof (wrong secret, replayed handshake),
    timeout, incomplete (closed mid-handshake), tls (TLS handshake failed). bad_frames: frames
    from authenticated peers that were malformed or over the limits (each closed its
    connection)."""

    __slots__ = ("accepted", "refused_by", "bad_frames")

    def __init__(self) -> None:
        self.accepted = 0
        self.refused_by = dict.fromkeys(REFUSALS, 0)
        self.bad_frames = 0

    @property
    def refused(self) -> int:
        return sum(self.refused_by.values())

    def snapshot(self) -> dict[str, Any]:
        return {"accepted": self.accepted, "refused": self.refused,
                "refused_by": dict(self.refused_by), "bad_frames": self.bad_frames}


class HandshakeGate(asyncio.Protocol):
    """Runs the handshake on a fresh connection, then hands it over to `make_conn()`.

    server: True on the accepting side. The client awaits `ready` (the StreamConnection, or
    AuthError). `make_conn` is called only after success: an unauthenticated peer costs no
    receive buffers. tls (server side): upgrade the plain connection to TLS first (the client
    side connects with TLS itself), so that a failed TLS handshake is counted too.
    """

    def __init__(self, *, server: bool, secret: bytes, make_conn: Callable[[], Any],
                 timeout_s: float, peer: str, stats: SecurityStats | None = None,
                 tls: ssl.SSLContext | None = None) -> None:
        self._server = server
        self._secret = secret
        self._make_conn = make_conn
        self._timeout_s = timeout_s
        self._peer = peer
        self._stats = stats
        self._transport: asyncio.Transport | None = None
        self._buf = bytearray()
        self._nonce = secrets.token_bytes(NONCE_BYTES)
        self._peer_nonce = b""
        self._timer: asyncio.TimerHandle | None = None
        self._state = "open"  # open -> done | refused
        self._tls = tls
        self._tls_task: asyncio.Task[None] | None = None
        self._tls_pending = tls is not None
        self._binding = b""  # the TLS channel binding B (set once TLS is up; b"" without TLS)
        self.ready: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self.ready.add_done_callback(lambda f: f.cancelled() or f.exception())

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        peer = transport.get_extra_info("peername")
        if self._server and peer:
            self._peer = f"{self._peer} (peer {peer})"
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._timer = asyncio.get_running_loop().call_later(
            self._timeout_s, self._refuse, "timeout",
            f"no complete handshake within {self._timeout_s} s")
        if not self._server and not self._bind(transport):
            return  # a client's TLS (if any) is complete by now: create_connection did it
        if self._tls is not None:
            transport.pause_reading()  # start_tls takes over the socket before a byte is read
            self._tls_task = asyncio.get_running_loop().create_task(self._start_tls(transport))
            return
        if self._server:
            transport.write(HELLO_MAGIC + self._nonce)

    async def _start_tls(self, raw: asyncio.Transport) -> None:
        assert self._tls is not None
        loop = asyncio.get_running_loop()
        try:
            tls_transport = await loop.start_tls(raw, self, self._tls, server_side=True,
                                                 ssl_handshake_timeout=self._timeout_s)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 (SSLError, reset, timeout: all a refusal)
            self._refuse("tls", f"TLS handshake failed: {exc!r}")
            return
        self._tls_pending = False
        if tls_transport is None or self._state != "open":
            return
        self._transport = tls_transport
        if self._bind(tls_transport):
            tls_transport.write(HELLO_MAGIC + self._nonce)

    def _bind(self, transport: asyncio.BaseTransport) -> bool:
        try:
            self._binding = channel_binding(transport)
        except AuthError as exc:
            self._refuse("tls", str(exc))
            return False
        return True

    def data_received(self, data: bytes) -> None:
        if self._state != "open":
            return
        self._buf += data
        if len(self._buf) >= len(HELLO_MAGIC) and self._buf[:4] != HELLO_MAGIC:
            self._refuse("no_handshake", "the peer did not start with an eaas handshake "
                         "(no cluster secret, or not an eaas peer)")
            return
        if self._server:
            self._serve_step()
        else:
            self._client_step()

    def _serve_step(self) -> None:
        assert self._transport is not None
        if len(self._buf) < _PROOF:
            return
        client_nonce = bytes(self._buf[4:4 + NONCE_BYTES])
        got = bytes(self._buf[4 + NONCE_BYTES:_PROOF])
        if not hmac.compare_digest(got, _mac(self._secret, _CLIENT_LABEL, self._nonce,
                                             client_nonce, self._binding)):
            self._refuse("bad_proof", "the peer's proof is wrong (another cluster secret, "
                         "a replayed handshake, or a relay between two TLS sessions)")
            return
        self._transport.write(_mac(self._secret, _SERVER_LABEL, client_nonce, self._nonce,
                                   self._binding))
        self._done(bytes(self._buf[_PROOF:]))

    def _client_step(self) -> None:
        assert self._transport is not None
        if not self._peer_nonce:
            if len(self._buf) < _CHALLENGE:
                return
            self._peer_nonce = bytes(self._buf[4:_CHALLENGE])
            self._transport.write(HELLO_MAGIC + self._nonce + _mac(
                self._secret, _CLIENT_LABEL, self._peer_nonce, self._nonce, self._binding))
        if len(self._buf) < _CHALLENGE + MAC_BYTES:
            return
        got = bytes(self._buf[_CHALLENGE:_CHALLENGE + MAC_BYTES])
        if not hmac.compare_digest(got, _mac(self._secret, _SERVER_LABEL, self._nonce,
                                             self._peer_nonce, self._binding)):
            self._refuse("bad_proof", "the server's proof is wrong (it does not hold this "
                         "cluster secret)")
            return
        self._done(bytes(self._buf[_CHALLENGE + MAC_BYTES:]))

    def _done(self, rest: bytes) -> None:
        assert self._transport is not None
        self._state = "done"
        self._cancel_timer()
        self._buf = bytearray()
        if self._stats is not None:
            self._stats.accepted += 1
        conn = self._make_conn()
        self._transport.set_protocol(conn)
        conn.connection_made(self._transport)
        view = memoryview(rest)
        while len(view) and not conn.closed:  # bytes that came right behind the handshake
            buf = conn.get_buffer(len(view))
            n = min(len(buf), len(view))
            buf[:n] = view[:n]
            conn.buffer_updated(n)
            view = view[n:]
        if not self.ready.done():
            self.ready.set_result(conn)

    def _refuse(self, reason: str, why: str) -> None:
        if self._state != "open":
            return
        self._state = "refused"
        self._cancel_timer()
        self._buf = bytearray()
        if self._stats is not None:
            self._stats.refused_by[reason] += 1
        side = "refused a connection from" if self._server else "could not authenticate"
        log.warning("%s %s: %s", side, self._peer, why)
        if not self.ready.done():
            self.ready.set_exception(AuthError(f"{self._peer}: {why}"))
        if self._transport is not None:
            self._transport.abort()

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if self._tls_pending:
            self._refuse("tls", f"TLS handshake failed ({exc!r})")
        elif not self._server and self._peer_nonce:
            self._refuse("bad_proof", "the server closed the connection on our proof (does it "
                         "hold another cluster secret?)")
        else:
            self._refuse("incomplete", "the connection closed during the handshake"
                         + (f" ({exc!r})" if exc is not None else ""))
        if self._tls_task is not None and not self._tls_task.done():
            self._tls_task.cancel()
