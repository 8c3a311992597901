"""What an expert server accepts, beyond the authentication every connection to a server
process passes first (eaas.transport.handshake).

    guard = RequestGuard.from_env()        # a server process: the engine's settings, or defaults
    msg = guard.check(tree_or_message)     # ValueError / PermissionError: refused, not run

A request is a message of the expert-server protocol (eaas.engine.protocol): a tagged tree from
a peer is decoded first, every field checked (unknown ops, missing or ill-typed fields, a
compute request whose tensors are not [N, H] rows and [N] integer ids are refused there). Then
the policy: a compute request of more than `max_rows` rows is refused (a 262,144-row request
once blocked a server until it was killed for missed heartbeats; the engine splits bigger
batches itself); `delay` unless the server runs in fault-injection mode (a `delay` of 1e9 s once
stalled a server that heartbeats kept in routing), and any delay over MAX_DELAY_S. Each refusal
is counted. In-process servers use `RequestGuard.in_process()`: their only sender is the engine.
"""

from __future__ import annotations

from typing import Any

from eaas.engine.messages import ComputeBatch, SetDelay
from eaas.engine.protocol import SERVER_PROTOCOL
from eaas.transport.auth import exported_settings

__all__ = ["RequestGuard", "OPS", "MAX_DELAY_S", "DEFAULT_MAX_ROWS"]

OPS = SERVER_PROTOCOL.tags  # ("compute", "ping", "stats", "load", "unload", "delay")
MAX_DELAY_S = 60.0
DEFAULT_MAX_ROWS = 65536  # = config transport.max_rows's default


class RequestGuard:
    """The request policy of one server process, and how many requests it refused."""

    def __init__(self, *, max_rows: int | None = DEFAULT_MAX_ROWS,
                 fault_injection: bool = False) -> None:
        if max_rows is not None and (not isinstance(max_rows, int) or isinstance(max_rows, bool)
                                     or max_rows < 1):
            raise ValueError(f"max_rows={max_rows!r}: must be an int >= 1 (None: no limit)")
        self.max_rows = max_rows
        if not isinstance(fault_injection, bool):
            raise ValueError(f"fault_injection={fault_injection!r}: must be true or false")
        self.fault_injection = fault_injection
        self.refused = 0

    @classmethod
    def in_process(cls) -> RequestGuard:
        """The policy of an in-process server: no row limit (the shards batch as they need),
        fault injection on (its only sender is the engine's own pool)."""
        return cls(max_rows=None, fault_injection=True)

    @classmethod
    def from_env(cls) -> RequestGuard:
        """The policy the engine exported (transport.max_rows / fault_injection); a server
        started without it refuses fault injection."""
        settings = exported_settings()
        return cls(max_rows=settings.get("max_rows", DEFAULT_MAX_ROWS),
                   fault_injection=settings.get("fault_injection", False))

    def check(self, msg: Any) -> Any:
        """The request as a protocol dataclass, if acceptable; raises (and counts) otherwise.

        msg: a protocol dataclass (in-process) or a tagged tree from a peer (decoded here).
        """
        try:
            if isinstance(msg, dict) or msg not in SERVER_PROTOCOL:
                msg = SERVER_PROTOCOL.decode(msg)
            self._check(msg)
            return msg
        except (ValueError, TypeError, PermissionError):
            self.refused += 1
            raise

    def _check(self, msg: Any) -> None:
        if isinstance(msg, ComputeBatch):
            rows = int(msg.x.shape[0])
            if self.max_rows is not None and rows > self.max_rows:
                raise ValueError(f"compute request of {rows} rows refused: more than max_rows="
                                 f"{self.max_rows} (transport.max_rows; the engine splits "
                                 "bigger batches)")
        elif isinstance(msg, SetDelay):
            if not self.fault_injection:
                raise PermissionError("'delay' is a fault-injection request and this server is "
                                      "not in fault-injection mode (transport.fault_injection)")
            if not 0 <= msg.seconds <= MAX_DELAY_S:
                raise ValueError(f"delay seconds={msg.seconds!r}: must be a number >= 0 and "
                                 f"<= {MAX_DELAY_S}")
