"""Recent work-unit round-trip times per expert server, and the hedge delay they give.

A unit unanswered for `hedge_delay(server)` is also sent to another live replica (a hedged
resend: the first answer wins). The delay adapts to the server: `factor` x its recent p99
round trip, clamped to [floor_s, cap_s]; before `min_samples` answers it is cap_s
(`fault.hedge_after_s`). Example: cap 0.25 s, p99 of the last answers 50 ms -> 0.2 s; p99
15 ms -> 0.15 s (the floor: below it, hiccups of a shared CPU — a GC pause, a busy core — would
be hedged, and the first copy wins most of them anyway).
"""

from __future__ import annotations

from collections import deque

__all__ = ["UnitLatency"]


class UnitLatency:
    def __init__(self, cap_s: float, *, factor: float = 4.0, floor_s: float = 0.15,
                 window: int = 256, min_samples: int = 32, every: int = 32) -> None:
        self.cap_s, self.factor, self.floor_s = cap_s, factor, min(floor_s, cap_s)
        self.window, self.min_samples, self.every = window, min_samples, every
        self._samples: dict[str, deque[float]] = {}
        self._since: dict[str, int] = {}  # answers since the server's delay was recomputed
        self._delay: dict[str, float] = {}  # cached hedge delay per server

    def observe(self, server: str, seconds: float) -> None:
        """One answered unit of `server` took `seconds` from send to result."""
        xs = self._samples.get(server)
        if xs is None:
            xs = self._samples[server] = deque(maxlen=self.window)
        xs.append(seconds)
        n = self._since.get(server, 0) + 1
        if n >= self.every and len(xs) >= self.min_samples:
            ordered = sorted(xs)
            p99 = ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]
            self._delay[server] = min(self.cap_s, max(self.floor_s, self.factor * p99))
            n = 0
        self._since[server] = n

    def hedge_delay(self, server: str) -> float:
        """Seconds after which a unit at `server` is hedged."""
        return self._delay.get(server, self.cap_s)

    def forget(self, server: str) -> None:
        """A server that is dead (it comes back as a fresh process) starts from cap_s again."""
        for d in (self._samples, self._since, self._delay):
            d.pop(server, None)
