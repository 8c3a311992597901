"""Supervision config: `RestartPolicy`, `ChildSpec` and `restart_set` (which children restart).

Plain frozen data, validated on construction; the `Supervisor` actor (supervisor.py) applies
them, and the supervision protocol (control.py) carries `ChildSpec`s to it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

from eaas.actors.actor import Actor
from eaas.errors import ConfigError

__all__ = ["RestartPolicy", "ChildSpec", "restart_set", "STRATEGIES", "RESTART_TYPES"]

STRATEGIES = ("one_for_one", "one_for_all", "rest_for_one")
RESTART_TYPES = ("permanent", "transient", "temporary")


@dataclass(frozen=True, slots=True)
class RestartPolicy:
    """How a supervisor reacts to a child's exit (see the module docstring)."""

    strategy: Literal["one_for_one", "one_for_all", "rest_for_one"] = "one_for_one"
    max_restarts: int = 3
    within_s: float = 5.0
    backoff_s: float = 0.01
    max_backoff_s: float = 1.0
    jitter: float = 0.1

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ConfigError(f"RestartPolicy.strategy={self.strategy!r}; allowed: {STRATEGIES}")
        if not isinstance(self.max_restarts, int) or self.max_restarts < 0:
            raise ConfigError(f"RestartPolicy.max_restarts={self.max_restarts!r}; "
                              "allowed: an int >= 0")
        if not self.within_s > 0:
            raise ConfigError(f"RestartPolicy.within_s={self.within_s!r}; allowed: > 0")
        if not self.backoff_s >= 0:
            raise ConfigError(f"RestartPolicy.backoff_s={self.backoff_s!r}; allowed: >= 0")
        if not self.max_backoff_s >= self.backoff_s:
            raise ConfigError(f"RestartPolicy.max_backoff_s={self.max_backoff_s!r}; "
                              f"allowed: >= backoff_s ({self.backoff_s})")
        if not 0 <= self.jitter <= 1:
            raise ConfigError(f"RestartPolicy.jitter={self.jitter!r}; allowed: 0 <= jitter <= 1")

    def backoff(self, restarts_in_window: int, rand: float = 0.5) -> float:
        """Delay before the n-th restart in the window; `rand` in [0, 1) drives the jitter."""
        base = min(self.max_backoff_s, self.backoff_s * 2 ** max(0, restarts_in_window - 1))
        return base * (1.0 + self.jitter * (2.0 * rand - 1.0))


@dataclass(frozen=True, slots=True)
class ChildSpec:
    """One supervised child: its name, how to build it, and when to restart it."""

    name: str
    factory: Callable[[], Actor]
    restart: Literal["permanent", "transient", "temporary"] = "permanent"
    mailbox_size: int = 1024

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ConfigError(f"ChildSpec.name={self.name!r}; allowed: a non-empty str")
        if not callable(self.factory):
            raise ConfigError(f"ChildSpec.factory={self.factory!r}; allowed: a callable "
                              "returning an Actor")
        if self.restart not in RESTART_TYPES:
            raise ConfigError(f"ChildSpec.restart={self.restart!r}; allowed: {RESTART_TYPES}")
        if not isinstance(self.mailbox_size, int) or self.mailbox_size < 1:
            raise ConfigError(f"ChildSpec.mailbox_size={self.mailbox_size!r}; "
                              "allowed: an int >= 1")


def restart_set(strategy: str, order: Sequence[str], failed: str) -> list[str]:
    """Names the strategy restarts when `failed` exits, in start order.

    >>> restart_set("rest_for_one", ["a", "b", "c"], "b")
    ['b', 'c']
    """
    if strategy == "one_for_one":
        return [failed]
    if strategy == "one_for_all":
        return list(order)
    if strategy == "rest_for_one":
        return list(order[order.index(failed):])
    raise ValueError(f"unknown strategy {strategy!r}; allowed: {STRATEGIES}")

