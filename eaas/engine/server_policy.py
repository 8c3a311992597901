"""What an expert-server process accepts from its peer, beyond the authentication every
connection passes first (eaas.transport.handshake).

    guard = RequestGuard.from_env()        # the engine's transport settings, or the defaults
    op = guard.check(msg)                  # ValueError / PermissionError: refused, not run

Refused: unknown ops; a compute request whose tensors are not [N, H] rows and [N] integer ids,
or whose N is over `max_rows` (a 262,144-row request once blocked a server until it was killed
for missed heartbeats; the engine splits bigger batches itself); `delay` unless the server runs
in fault-injection mode (a `delay` of 1e9 s once stalled a server that heartbeats kept in
routing), and any delay over MAX_DELAY_S or not a finite number >= 0. Each refusal is counted.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from eaas.transport.auth import exported_settings

__all__ = ["RequestGuard", "OPS", "MAX_DELAY_S", "DEFAULT_MAX_ROWS"]

OPS = ("compute", "ping", "stats", "load", "unload", "delay")
MAX_DELAY_S = 60.0
DEFAULT_MAX_ROWS = 65536  # = config transport.max_rows's default


class RequestGuard:
    """The request policy of one server process, and how many requests it refused."""

    def __init__(self, *, max_rows: int = DEFAULT_MAX_ROWS, fault_injection: bool = False) -> None:
        if not isinstance(max_rows, int) or isinstance(max_rows, bool) or max_rows < 1:
            raise ValueError(f"max_rows={max_rows!r}: must be an int >= 1")
        self.max_rows = max_rows
        if not isinstance(fault_injection, bool):
            raise ValueError(f"fault_injection={fault_injection!r}: must be true or false")
        self.fault_injection = fault_injection
        self.refused = 0

    @classmethod
    def from_env(cls) -> RequestGuard:
        """The policy the engine exported (transport.max_rows / fault_injection); a server
        started without it refuses fault injection."""
        settings = exported_settings()
        return cls(max_rows=settings.get("max_rows", DEFAULT_MAX_ROWS),
                   fault_injection=settings.get("fault_injection", False))

    def check(self, msg: Any) -> str:
        """The op of an acceptable request; raises (and counts) for one to refuse."""
        try:
            return self._check(msg)
        except (ValueError, TypeError, PermissionError):
            self.refused += 1
            raise

    def _check(self, msg: Any) -> str:
        op = msg.get("op") if isinstance(msg, dict) else None
        if op not in OPS:
            raise ValueError(f"unknown request op {op!r}; allowed: {', '.join(OPS)}")
        if op == "compute":
            self._check_compute(msg)
        elif op == "delay":
            if not self.fault_injection:
                raise PermissionError("'delay' is a fault-injection request and this server is "
                                      "not in fault-injection mode (transport.fault_injection)")
            seconds = msg.get("seconds")
            if (not isinstance(seconds, (int, float)) or isinstance(seconds, bool)
                    or not math.isfinite(seconds) or not 0 <= seconds <= MAX_DELAY_S):
                raise ValueError(f"delay seconds={seconds!r}: must be a number >= 0 and "
                                 f"<= {MAX_DELAY_S}")
        elif op in ("load", "unload"):
            experts = msg.get("experts")
            if not isinstance(experts, dict) or not all(
                    isinstance(ids, list) and all(isinstance(e, int) for e in ids)
                    for ids in experts.values()):
                raise ValueError(f"{op} experts must be a map {{layer: [expert ids]}}")
        return op

    def _check_compute(self, msg: dict) -> None:
        x, ids, layer = msg.get("x"), msg.get("expert_ids"), msg.get("layer")
        if not isinstance(layer, int) or isinstance(layer, bool):
            raise ValueError(f"compute layer={layer!r}: must be an int")
        if not isinstance(x, torch.Tensor) or x.dim() != 2:
            raise ValueError("compute x must be a [N, H] tensor of rows")
        if (not isinstance(ids, torch.Tensor) or ids.dim() != 1
                or ids.dtype.is_floating_point or ids.dtype == torch.bool):
            raise ValueError("compute expert_ids must be a [N] integer tensor")
        rows = int(x.shape[0])
        if rows != ids.shape[0]:
            raise ValueError(f"compute x has {rows} rows but expert_ids {ids.shape[0]}")
        if rows > self.max_rows:
            raise ValueError(f"compute request of {rows} rows refused: more than max_rows="
                             f"{self.max_rows} (transport.max_rows; the engine splits bigger "
                             "batches)")
