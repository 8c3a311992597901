"""Framed connections over asyncio byte streams (tcp:// and shm://'s control socket).

Receiving is an asyncio.BufferedProtocol: small frames are parsed out of a staging buffer;
a frame whose body is over BIG_BODY bytes gets its own (uninitialised) uint8 tensor that the
socket reads straight into (no intermediate copies), and that tensor becomes the received tensors'
memory. Every length is checked against TransportLimits before anything is allocated.

With a TransportSecurity, a connection first runs the mutual HMAC handshake (and, tcp://, TLS;
eaas.transport.handshake): a listener creates the StreamConnection, and runs its handler, only
for a peer that proved it holds the cluster secret, and counts the others in `listener.stats`.
A connection's receive buffers are dropped when it closes (a half-received frame included).

Sending writes prefix+header and each tensor's bytes straight from the tensor's memory
(`transport.write` per piece; no join). The write-buffer limits are (high=0, low=0), so
the protocol learns the moment the buffer is empty: that is when send handles complete,
and when the caller may mutate the sent tensors again.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
from collections.abc import Awaitable
from typing import TYPE_CHECKING, Any, Callable

import torch

from eaas.errors import AuthError, FrameError, TransportError
from eaas.transport.base import Connection, Handler, Inbox, Listener, SendHandle
from eaas.transport.codec import (KIND_MESSAGE, MAGIC, PREFIX, PREFIX_BYTES, EncodedMessage,
                                  build_tensors, check_prefix, flatten, parse_header, unflatten)
from eaas.transport.handshake import HandshakeGate, SecurityStats
from eaas.transport.limits import TransportLimits

if TYPE_CHECKING:
    from eaas.transport.auth import TransportSecurity

__all__ = ["StreamConnection", "StreamListener", "connect_stream"]

log = logging.getLogger("eaas.transport")
STAGE_BYTES = 256 << 10
BIG_BODY = 64 << 10
SMALL_FRAME = 64 << 10  # frames up to this size are joined and written in one call


class StreamConnection(Connection, asyncio.BufferedProtocol):
    """A Connection that is also the asyncio protocol of its socket."""

    def __init__(self, url: str, limits: TransportLimits,
                 on_made: Any = None) -> None:
        self.url = url
        self.limits = limits
        self._on_made = on_made
        self._transport: asyncio.Transport | None = None
        self._closed = False
        self._local_close = False  # we called aclose() while the peer was (as far as we know) up
        self._inbox = Inbox(low=limits.max_queued_messages // 2, on_low=self._maybe_resume,
                            low_bytes=limits.max_queued_bytes // 2)
        self._reading_paused = False
        self._write_paused = False
        self._drain_waiters: list[asyncio.Future[None]] = []
        self._closed_event = asyncio.Event()
        self._gpu_waiting = False  # an event of ours is with eaas.gpu.waiter's thread
        self.stats: SecurityStats | None = None  # the accepting listener's (bad frames count)
        # receive state
        self._stage = bytearray(STAGE_BYTES)
        self._start = 0
        self._end = 0
        self._need: tuple[int, int] | None = None
        self._big: torch.Tensor | None = None  # [body_len] uint8: the body being received
        self._big_view: memoryview | None = None
        self._big_head: dict[str, Any] | None = None
        self._big_filled = 0

    # ---- Connection -------------------------------------------------------------------
    @property
    def closed(self) -> bool:
        return self._closed

    def send_start(self, msg: Any) -> SendHandle:
        self._check_open()
        return self._write_parts(flatten(msg, self.limits).frame_parts(self.limits))

    async def recv(self, timeout: float | None = None) -> Any:
        return await self._inbox.get(timeout)

    async def aclose(self) -> None:
        if not self._closed:
            self._closed = True
            self._local_close = True
            self._inbox.fail(TransportError(f"connection to {self.url} is closed"), discard=True)
            if self._transport is not None:
                self._transport.close()
        if self._transport is not None:
            try:
                async with asyncio.timeout(5.0):
                    await self._closed_event.wait()
            except TimeoutError:
                self._transport.abort()

    # ---- sending ----------------------------------------------------------------------
    def _check_open(self) -> None:
        if self._closed or self._transport is None or self._transport.is_closing():
            raise TransportError(f"connection to {self.url} is closed")

    def _write_parts(self, parts: list[Any]) -> SendHandle:
        assert self._transport is not None
        if len(parts) > 1 and sum(len(p) for p in parts) <= SMALL_FRAME:
            parts = [b"".join(parts)]  # one syscall instead of several: small frames are latency
        write = self._transport.write
        for part in parts:
            write(part)
        if not self._write_paused:
            return SendHandle()
        future = asyncio.get_running_loop().create_future()
        self._drain_waiters.append(future)
        return SendHandle(future)

    def _send_control(self, kind: int, **extra: Any) -> None:
        """Write a body-less control frame of `kind` with header fields `extra` (if open)."""
        if self._closed or self._transport is None or self._transport.is_closing():
            return
        header = EncodedMessage(tree=b"\xc0").header(kind, **extra)
        self._write_parts([PREFIX.pack(MAGIC, len(header), 0) + header])

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        waiters, self._drain_waiters = self._drain_waiters, []
        for future in waiters:
            if not future.done():
                future.set_result(None)

    # ---- protocol: lifecycle ----------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        transport.set_write_buffer_limits(high=0, low=0)
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # frames are latency-bound
        if self._on_made is not None:
            self._on_made(self)

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        mid_frame = self._big is not None or self._end > self._start
        if self._closed:
            error: TransportError = TransportError(f"connection to {self.url} is closed")
        elif mid_frame:
            error = FrameError(f"truncated frame: peer {self.url} closed the connection mid-frame")
        elif exc is not None:
            error = TransportError(f"connection to {self.url} lost: {exc!r}")
        else:
            error = TransportError(f"connection closed by peer {self.url}")
        self._closed = True
        self._inbox.fail(error)
        # release the receive buffers now (a half-received big body too): the connection
        # object itself may live on until the cyclic GC runs
        self._big = self._big_view = self._big_head = None
        self._stage = bytearray()
        self._start = self._end = 0
        waiters, self._drain_waiters = self._drain_waiters, []
        for future in waiters:
            if not future.done():
                future.set_exception(TransportError(f"connection to {self.url} lost before "
                                                    "the message was sent"))
        self._closed_event.set()
        self._on_closed()

    def _on_closed(self) -> None:
        """Hook for subclasses: release resources once the socket is gone."""

    def _after_gpu(self, event: Any, then: Callable[[], None]) -> None:
        """Run `then()` on the loop once CUDA `event` completed (eaas.gpu.waiter; one wait per
        connection at a time, so `then` should take every completed item and call back here for
        the rest). A CUDA error closes the connection: nothing it holds can be trusted."""
        if self._gpu_waiting or self._closed:
            return
        from eaas.gpu.waiter import when_done  # noqa: PLC0415 (GPU transports only)

        def woken(error: BaseException | None) -> None:
            self._gpu_waiting = False
            if self._closed:
                return
            try:
                if error is not None:
                    raise error
                then()
            except Exception as exc:  # noqa: BLE001
                self._fail(TransportError(f"CUDA error while waiting for the GPU: {exc!r}"))

        self._gpu_waiting = True
        when_done(event, woken)

    def _fail(self, error: TransportError) -> None:
        log.warning("closing connection to %s: %s", self.url, error)
        if isinstance(error, FrameError) and self.stats is not None:
            self.stats.bad_frames += 1
        self._inbox.fail(error)
        self._closed = True
        if self._transport is not None:
            self._transport.abort()

    def _maybe_resume(self) -> None:
        if self._reading_paused and self._transport is not None and not self._closed:
            self._reading_paused = False
            self._transport.resume_reading()

    # ---- protocol: receiving ----------------------------------------------------------
    def get_buffer(self, sizehint: int) -> memoryview:
        if self._big is not None:
            return self._big_view[self._big_filled:]
        if len(self._stage) - self._end < 4096:
            self._reserve(self._end - self._start + 4096)
        return memoryview(self._stage)[self._end:]

    def buffer_updated(self, nbytes: int) -> None:
        if self._closed:
            return
        try:
            if self._big is not None:
                self._big_filled += nbytes
                if self._big_filled == self._big.numel():
                    head, body = self._big_head, self._big
                    self._big, self._big_head, self._big_view = None, None, None
                    assert head is not None
                    self._deliver(head, body)
                return
            self._end += nbytes
            self._parse()
        except FrameError as exc:
            self._fail(exc)
        except Exception as exc:  # a decoder bug must not kill the listener: drop the peer
            self._fail(FrameError(f"cannot decode frame: {exc!r}"))

    def _parse(self) -> None:
        while not self._closed:
            start, avail = self._start, self._end - self._start
            if avail < PREFIX_BYTES:
                break
            if self._need is None:
                self._need = check_prefix(self._stage[start:start + PREFIX_BYTES], self.limits)
            header_len, body_len = self._need
            body_at = start + PREFIX_BYTES + header_len
            total = PREFIX_BYTES + header_len + body_len
            if avail < PREFIX_BYTES + header_len:
                self._reserve(PREFIX_BYTES + header_len)
                break
            if avail >= total:
                head = parse_header(bytes(self._stage[start + PREFIX_BYTES:body_at]), self.limits)
                body = bytearray(memoryview(self._stage)[body_at:start + total])
                self._start += total
                self._need = None
                self._deliver(head, body)
                continue
            if body_len > BIG_BODY:
                head = parse_header(bytes(self._stage[start + PREFIX_BYTES:body_at]), self.limits)
                got = self._end - body_at
                big = torch.empty(body_len, dtype=torch.uint8)  # [body_len], not zero-filled
                self._big_view = memoryview(big.numpy())
                self._big_view[:got] = memoryview(self._stage)[body_at:self._end]
                self._big, self._big_head, self._big_filled = big, head, got
                self._start = self._end = 0
                self._need = None
                return
            self._reserve(total)
            break
        if self._start == self._end:
            self._start = self._end = 0

    def _reserve(self, need: int) -> None:
        """Make the staging buffer hold `need` bytes from the current frame start.

        Never resizes in place: asyncio may still hold a memoryview of the old buffer.
        """
        pending = self._end - self._start
        if len(self._stage) - self._start >= need and self._start == 0:
            return
        size = max(len(self._stage), need, STAGE_BYTES)
        if size > len(self._stage):
            stage = bytearray(size)
            stage[:pending] = memoryview(self._stage)[self._start:self._end]
            self._stage = stage
        else:
            self._stage[:pending] = self._stage[self._start:self._end]
        self._start, self._end = 0, pending

    def _deliver(self, head: dict[str, Any], body: bytearray | torch.Tensor) -> None:
        msg = self._on_frame(head, body)
        if msg is _NOTHING:
            return
        self._inbox.put(msg, body.numel() if isinstance(body, torch.Tensor) else len(body))
        if not self._reading_paused and (len(self._inbox) >= self.limits.max_queued_messages
                                         or self._inbox.nbytes >= self.limits.max_queued_bytes):
            assert self._transport is not None
            self._reading_paused = True
            self._transport.pause_reading()

    def _on_frame(self, head: dict[str, Any], body: bytearray | torch.Tensor) -> Any:
        """Turn one checked frame into a message (or _NOTHING for control frames)."""
        if head["k"] != KIND_MESSAGE:
            raise FrameError(f"unexpected frame kind {head['k']!r}")
        return unflatten(head["m"], build_tensors(head["t"], body, self.limits), self.limits)


_NOTHING = object()


class StreamListener(Listener):
    """An asyncio server whose connections are StreamConnections handed to `handler`."""

    def __init__(self, handler: Handler, limits: TransportLimits,
                 conn_class: Callable[..., StreamConnection] = StreamConnection,
                 security: TransportSecurity | None = None,
                 tls: ssl.SSLContext | None = None) -> None:
        self.url = ""
        self._conn_class = conn_class
        self._handler = handler
        self.limits = limits
        self.security = security  # None: no handshake (tests, trusted in-host use)
        self._tls = tls  # server-side TLS context (tcp:// with security.tls)
        self.stats = SecurityStats()
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._closed = False

    def protocol_factory(self, peer_url: str) -> asyncio.BaseProtocol:
        def make() -> StreamConnection:
            conn = self._conn_class(peer_url, self.limits, on_made=self._accepted)
            conn.stats = self.stats
            return conn

        if self.security is None:
            return make()
        return HandshakeGate(server=True, secret=self.security.secret, make_conn=make,
                             timeout_s=self.security.handshake_timeout_s, peer=self.url,
                             stats=self.stats, tls=self._tls)

    def _accepted(self, conn: StreamConnection) -> None:
        if self._closed:
            conn._fail(FrameError("listener is closing"))
            return
        self._run_handler(conn)

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._server is not None:
            self._server.close()
        await self._cancel_handlers()
        if self._server is not None:
            try:
                async with asyncio.timeout(5.0):
                    await self._server.wait_closed()
            except TimeoutError:
                log.warning("listener %s: server did not close within 5 s", self.url)


async def connect_stream(open_conn: Callable[[Callable[[], asyncio.BaseProtocol]], Awaitable[Any]],
                         make_conn: Callable[[], StreamConnection], url: str, timeout: float,
                         security: TransportSecurity | None) -> StreamConnection:
    """Open a connection with `open_conn(protocol_factory)` (e.g. a partial of
    loop.create_connection) and, with `security`, authenticate it; TransportError (AuthError for
    a failed handshake) if that fails or `timeout` passes."""
    gate: HandshakeGate | None = None

    def factory() -> asyncio.BaseProtocol:
        nonlocal gate
        if security is None:
            return make_conn()
        gate = HandshakeGate(server=False, secret=security.secret, make_conn=make_conn,
                             timeout_s=security.handshake_timeout_s, peer=url)
        return gate

    try:
        async with asyncio.timeout(timeout):
            _, proto = await open_conn(factory)
            if gate is None:
                return proto
            return await gate.ready
    except TimeoutError:
        if gate is not None:
            gate._refuse("timeout", f"connect timed out after {timeout} s")
        raise TransportError(f"connect to {url} timed out after {timeout} s") from None
    except ssl.SSLError as exc:
        raise AuthError(f"TLS handshake with {url} failed: {exc}") from exc
    except AuthError:
        raise
    except OSError as exc:
        raise TransportError(f"cannot connect to {url}: {exc}") from exc
