"""Prometheus metrics of one app, in its own `CollectorRegistry` (never the global one).

Request metrics are named as vLLM names them, with the `eaas_` prefix and base units:
`eaas_time_to_first_token_seconds`, `eaas_inter_token_latency_seconds`,
`eaas_e2e_request_latency_seconds` (histograms), `eaas_prompt_tokens_total`,
`eaas_generation_tokens_total`, `eaas_request_success_total{finished_reason}`,
`eaas_http_requests_total{method,route,status}`. Engine and actor metrics are read from
`engine.snapshot()` at scrape time (`SnapshotCollector`): `eaas_actor_restarts_total{actor}`,
`eaas_actor_mailbox_depth{actor}`, `eaas_actor_state{actor,state}`, every engine counter as
`eaas_<name>_total` (reroutes, dead_letters, ...), running/waiting requests, per-server
in-flight tokens and up/down, the routing generation, and the paged KV cache:
`eaas_kv_cache_usage_ratio` (blocks in use / blocks in all shards' pools, 0..1; vLLM's
`vllm:kv_cache_usage_perc`) with `eaas_kv_cache_used_blocks{shard}` /
`eaas_kv_cache_total_blocks{shard}`, read from the snapshot's `shards` (each shard's stats:
`kv_blocks_used`, `kv_blocks_total`; missing keys count 0). The snapshot callable must return
a normalized snapshot (`snapshot.normalize`: flat actor list, per-server `up`); the app's
(`ServingState.snapshot`) also passes it through `snapshot.MonotonicCounters`, so that every
`_total` family here only ever goes up, even when the engine's live values drop.

`Timeline` keeps per-second buckets (tokens, finished requests, latencies) for the admin
dashboard's throughput and latency charts.
"""

from __future__ import annotations

import logging
import re
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

from eaas.serving.snapshot import kv_cache_usage

__all__ = ["CONTENT_TYPE_LATEST", "ServingMetrics", "SnapshotCollector", "Timeline"]

log = logging.getLogger("eaas.serving")

# vLLM's buckets (seconds)
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
               10.0, 20.0, 40.0, 80.0)
E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0,
               120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)


class ServingMetrics:
    """The metrics one app records; `render()` is the `/metrics` body."""

    def __init__(self, model_name: str, snapshot: Callable[[], dict] | None = None) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r, m = self.registry, ["model_name"]
        self.model_name = model_name
        self.ttft = Histogram("eaas_time_to_first_token_seconds", "Time to first token.", m,
                              buckets=TTFT_BUCKETS, registry=r)
        self.itl = Histogram("eaas_inter_token_latency_seconds", "Time between output tokens.",
                             m, buckets=ITL_BUCKETS, registry=r)
        self.e2e = Histogram("eaas_e2e_request_latency_seconds",
                             "End-to-end request latency (arrival to last token).", m,
                             buckets=E2E_BUCKETS, registry=r)
        self.prompt_tokens = Counter("eaas_prompt_tokens", "Prefill tokens processed.", m,
                                     registry=r)
        self.generation_tokens = Counter("eaas_generation_tokens", "Generated tokens.", m,
                                         registry=r)
        self.request_success = Counter("eaas_request_success", "Finished requests.",
                                       m + ["finished_reason"], registry=r)
        self.http_requests = Counter("eaas_http_requests", "HTTP responses by route and status.",
                                     ["method", "route", "status"], registry=r)
        self.timeline = Timeline()
        if snapshot is not None:
            r.register(SnapshotCollector(snapshot))

    def observe_tokens(self, num_new: int, now: float, first_at: float | None,
                       last_at: float | None, arrival: float) -> None:
        """Record `num_new` tokens that arrived at `now` (monotonic seconds)."""
        if num_new <= 0:
            return
        self.generation_tokens.labels(self.model_name).inc(num_new)
        self.timeline.add_tokens(now, num_new)
        if first_at is None:
            ttft = now - arrival
            self.ttft.labels(self.model_name).observe(ttft)
            self.timeline.add_ttft(now, ttft)
            num_new -= 1
        if num_new > 0 and last_at is not None:
            gap = (now - last_at) / num_new
            for _ in range(num_new):
                self.itl.labels(self.model_name).observe(gap)
            self.timeline.add_itl(now, gap)

    def observe_finished(self, reason: str, prompt_tokens: int, now: float, arrival: float) -> None:
        self.prompt_tokens.labels(self.model_name).inc(prompt_tokens)
        self.request_success.labels(self.model_name, reason).inc()
        self.e2e.labels(self.model_name).observe(now - arrival)
        self.timeline.add_finished(now, now - arrival)

    def render(self) -> bytes:
        """The exposition text without prometheus_client's `*_created` series (timestamps of
        each counter's creation: noise to scrapers, and vLLM drops them too)."""
        text = generate_latest(self.registry)
        return b"".join(line for line in text.splitlines(keepends=True)
                        if not _is_created(line))


def _is_created(line: bytes) -> bool:
    """A sample, HELP or TYPE line of a `*_created` family."""
    if line.startswith(b"# HELP ") or line.startswith(b"# TYPE "):
        name = line.split(b" ", 3)[2]
    else:
        name = line.split(b"{", 1)[0].split(b" ", 1)[0]
    return name.endswith(b"_created")


_NAME_OK = re.compile(r"[^a-zA-Z0-9_]")
# families this module defines itself; an engine counter of the same name is skipped
_OWN = frozenset({"eaas_prompt_tokens", "eaas_generation_tokens", "eaas_request_success",
                  "eaas_http_requests", "eaas_actor_restarts", "eaas_actor_mailbox_depth",
                  "eaas_actor_state", "eaas_num_requests_running", "eaas_num_requests_waiting",
                  "eaas_server_inflight_tokens", "eaas_server_up", "eaas_routing_generation",
                  "eaas_routing_dead_servers", "eaas_kv_cache_usage_ratio",
                  "eaas_kv_cache_used_blocks", "eaas_kv_cache_total_blocks"})


class SnapshotCollector:
    """Engine/actor metrics read from `engine.snapshot()` on each scrape."""

    def __init__(self, snapshot: Callable[[], dict]) -> None:
        self._snapshot = snapshot

    def describe(self) -> list[Metric]:
        return []  # names depend on the engine's counters; nothing to pre-register

    def collect(self) -> Iterator[Metric]:
        try:
            snap = self._snapshot()
        except Exception:  # a failing engine must not break the scrape of request metrics
            log.exception("engine snapshot failed during a /metrics scrape")
            snap = {}
        actors = snap.get("actors") or []
        restarts = CounterMetricFamily("eaas_actor_restarts", "Restarts of each actor.",
                                       labels=["actor", "kind"])
        depth = GaugeMetricFamily("eaas_actor_mailbox_depth", "Messages waiting in the mailbox.",
                                  labels=["actor", "kind"])
        state = GaugeMetricFamily("eaas_actor_state", "1 for the actor's current state.",
                                  labels=["actor", "kind", "state"])
        totals = snap.get("actor_restarts_total") or {}  # monotonic (MonotonicCounters)
        for a in actors:
            name, kind = str(a.get("name")), str(a.get("kind", ""))
            restarts.add_metric([name, kind], float(totals.get(name, a.get("restarts") or 0)))
            depth.add_metric([name, kind], float(a.get("mailbox_depth") or 0))
            state.add_metric([name, kind, str(a.get("state"))], 1.0)
        yield from (restarts, depth, state)
        for key, value in sorted((snap.get("counters") or {}).items()):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            name = "eaas_" + _NAME_OK.sub("_", str(key)).removesuffix("_total")
            if name in _OWN:
                continue
            yield CounterMetricFamily(name, f"Engine counter {key!r}.", value=float(value))
        for key, help_ in (("num_running", "Requests running."),
                           ("num_waiting", "Requests waiting to be scheduled.")):
            if key in snap:
                yield GaugeMetricFamily(f"eaas_num_requests_{key[4:]}", help_,
                                        value=float(snap[key]))
        servers = snap.get("servers") or []
        inflight = GaugeMetricFamily("eaas_server_inflight_tokens",
                                     "Token rows in flight to each expert server.",
                                     labels=["server"])
        up = GaugeMetricFamily("eaas_server_up", "1 if the expert server is running.",
                               labels=["server"])
        for s in servers:
            inflight.add_metric([str(s.get("name"))], float(s.get("inflight_tokens") or 0))
            up.add_metric([str(s.get("name"))], 1.0 if s.get("up") else 0.0)
        yield from (inflight, up)
        yield from self._kv_cache(snap.get("shards") or [])
        dead = GaugeMetricFamily("eaas_routing_dead_servers",
                                 "Servers the routing table has marked dead.")
        dead.add_metric([], float(len((snap.get("routing") or {}).get("dead") or [])))
        yield dead
        load = snap.get("load") or {}
        imbalance = GaugeMetricFamily(
            "eaas_layer_imbalance", "(max - mean) / mean of rows per expert server over the "
            "load window, per MoE layer (0 = perfectly balanced).", labels=["layer"])
        per_layer = (load.get("imbalance") or {}).items()
        for layer, value in sorted(per_layer, key=lambda kv: int(kv[0])):
            imbalance.add_metric([str(layer)], float(value))
        yield imbalance
        if load.get("expert_metrics"):  # opt-in: one series per (layer, expert)
            tokens = GaugeMetricFamily("eaas_expert_tokens", "Tokens routed to each expert over "
                                       "the load window.", labels=["layer", "expert"])
            for layer, row in enumerate(load.get("tokens") or []):
                if any(row):
                    for expert, n in enumerate(row):
                        tokens.add_metric([str(layer), str(expert)], float(n))
            yield tokens
        gen = (snap.get("routing") or {}).get("generation")
        if isinstance(gen, int):
            yield GaugeMetricFamily("eaas_routing_generation",
                                    "Generation number of the routing table.", value=float(gen))

    @staticmethod
    def _kv_cache(shards: list[dict]) -> Iterator[Metric]:
        used = GaugeMetricFamily("eaas_kv_cache_used_blocks",
                                 "KV cache blocks reserved by requests, per attention shard.",
                                 labels=["shard"])
        total = GaugeMetricFamily("eaas_kv_cache_total_blocks",
                                  "KV cache blocks in each attention shard's pool.",
                                  labels=["shard"])
        shards = [s for s in shards if isinstance(s, dict)]
        for s in shards:
            one = kv_cache_usage([s])
            used.add_metric([str(s.get("name"))], float(one["used_blocks"]))
            total.add_metric([str(s.get("name"))], float(one["total_blocks"]))
        yield from (used, total)
        yield GaugeMetricFamily("eaas_kv_cache_usage_ratio",
                                "Fraction of KV cache blocks in use over all attention shards "
                                "(0 when no pool is reported).",
                                value=kv_cache_usage(shards)["usage_ratio"])


@dataclass(slots=True)
class _Bucket:
    second: int
    tokens: int = 0
    finished: int = 0
    ttft: list[float] = field(default_factory=list)
    itl: list[float] = field(default_factory=list)
    e2e: list[float] = field(default_factory=list)


class Timeline:
    """Per-second buckets of the last `horizon_s` seconds (monotonic clock)."""

    def __init__(self, horizon_s: int = 300, clock: Callable[[], float] = time.monotonic) -> None:
        self.horizon_s = horizon_s
        self.clock = clock
        self._buckets: deque[_Bucket] = deque(maxlen=horizon_s)
        self._wall_offset = time.time() - time.monotonic()

    def _at(self, now: float) -> _Bucket:
        sec = int(now)
        if not self._buckets or self._buckets[-1].second < sec:
            self._buckets.append(_Bucket(sec))
        return self._buckets[-1]

    def add_tokens(self, now: float, n: int) -> None:
        self._at(now).tokens += n

    def add_ttft(self, now: float, s: float) -> None:
        self._at(now).ttft.append(s)

    def add_itl(self, now: float, s: float) -> None:
        self._at(now).itl.append(s)

    def add_finished(self, now: float, e2e: float) -> None:
        b = self._at(now)
        b.finished += 1
        b.e2e.append(e2e)

    def series(self, last_s: int = 120) -> list[dict]:
        """One point per second (wall-clock `t`), zeros where nothing happened."""
        now = int(self.clock())
        by_sec = {b.second: b for b in self._buckets}
        out = []
        for sec in range(now - last_s + 1, now + 1):
            b = by_sec.get(sec)
            out.append({
                "t": sec + self._wall_offset,
                "tokens_per_s": b.tokens if b else 0,
                "requests_per_s": b.finished if b else 0,
                "ttft_p50_s": _p50(b.ttft) if b else None,
                "itl_p50_s": _p50(b.itl) if b else None,
                "e2e_p50_s": _p50(b.e2e) if b else None,
            })
        return out


def _p50(xs: list[float]) -> float | None:
    return sorted(xs)[len(xs) // 2] if xs else None
